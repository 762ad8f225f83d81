"""Out-of-domain text sources (calib.ood) and mixed calibration (calib.data.calibration_windows with A+B)."""

from __future__ import annotations

import hashlib

import pytest
import torch

from lowmem_gblm.calib import ood
from lowmem_gblm.calib.data import calibration_windows, load_documents, mixed_sources
from lowmem_gblm.errors import InputError
from tests.tiny_eval import SENTENCES, make_tiny_llama


def _words(n: int, tag: str) -> str:
    return " ".join(f"{tag}{i}" for i in range(n))


def test_paragraph_sections_hand_counted():
    """Paragraphs of 600, 500, 300, 900 and 50 words, sections of at least 1000: [600+500], [300+900], [50]."""
    paras = [_words(600, "a"), _words(500, "b"), _words(300, "c"), _words(900, "d"), _words(50, "e")]
    got = ood.paragraph_sections("\n\n".join(paras), words=1000)
    assert got == ["\n\n".join(paras[:2]), "\n\n".join(paras[2:4]), paras[4]]


def test_table_rules_are_dropped_and_nothing_else():
    text = "Name   Value\n------ -----\nalpha  1\n+---+---+\n| x | y |\n\n===\nNext paragraph."
    assert ood.paragraph_sections(text, words=1) == ["Name   Value\nalpha  1\n| x | y |", "Next paragraph."]


def test_split_is_fixed_disjoint_and_in_digest_order():
    sections = [f"s{i}" for i in range(60)]
    calib, held = ood.split_sections("src", sections, "calib"), ood.split_sections("src", sections, "eval")
    assert sorted(calib + held) == sorted(sections) and not set(calib) & set(held)
    digest = {s: int(hashlib.sha256(f"src:{i}".encode()).hexdigest(), 16) for i, s in enumerate(sections)}
    assert held == sorted((s for s in sections if digest[s] % 10 == 0), key=digest.get)
    assert 1 <= len(held) <= 15  # about one in ten
    assert ood.split_sections("src", sections, "all") == sorted(sections, key=digest.get)
    assert ood.split_sections("other", sections, "eval") != held  # the source's name is part of the digest


def test_fetched_sources_read_their_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(ood.ENV_VAR, str(tmp_path))
    with pytest.raises(InputError, match="fetch_ood.sh"):
        load_documents("moby-dick:eval")
    (tmp_path / "moby-dick").mkdir()
    (tmp_path / "moby-dick" / "book.txt").write_text("\n\n".join(_words(400, f"p{k}_") for k in range(40)))
    held, calib = load_documents("moby-dick:eval"), load_documents("moby-dick:calib")
    assert len(held) + len(calib) == len(load_documents("moby-dick")) == 14  # 40 paragraphs of 400 words, by 3
    assert sorted(len(s.split()) for s in calib + held) == [400] + [1200] * 13  # 3 paragraphs each, the tail 1
    (tmp_path / "debian-docs").mkdir()
    (tmp_path / "debian-docs" / "bad.txt").write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(InputError, match="UTF-8"):
        load_documents("debian-docs")


def test_python_stdlib_is_the_running_pythons_own_sources():
    held = load_documents("python-stdlib:eval")
    calib = load_documents("python-stdlib:calib")
    assert held and calib and not set(held) & set(calib)
    assert any("def " in s for s in held)  # code


def test_a_mix_takes_an_equal_share_from_each_source_in_order(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(make_tiny_llama(tmp_path / "m"))
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(" ".join(SENTENCES * 8))
    b.write_text(" ".join(reversed(SENTENCES * 8)))
    got = calibration_windows(tok, f"{a}+{b}", 5, 16, 3)
    assert torch.equal(got, torch.cat([calibration_windows(tok, str(a), 3, 16, 3),
                                       calibration_windows(tok, str(b), 2, 16, 3)]))
    assert mixed_sources(str(a)) is None and mixed_sources(f"{a}+{b}") == [str(a), str(b)]
    plus = tmp_path / "c+d.txt"  # a file whose name holds a '+' is one source
    plus.write_text(a.read_text())
    assert mixed_sources(str(plus)) is None
    with pytest.raises(InputError, match="empty source"):
        mixed_sources(f"{a}+")
