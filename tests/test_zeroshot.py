"""eval --tasks: the streamed lm-eval LM against lm-eval's own ``hf`` model (HFLM) on tiny checkpoints, offline."""

import json
import os
import sys

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local tasks only: lm-eval must not need the network
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from cli.main import app  # noqa: E402
from lowmem_gblm.engine.loglik import plan_batches, streamed_loglikelihoods  # noqa: E402
from lowmem_gblm.errors import UsageError  # noqa: E402
from lowmem_gblm.io.model import StreamedModel  # noqa: E402
from lowmem_gblm.zeroshot import INSTALL_HINT, require_lm_eval  # noqa: E402
from lowmem_gblm.zeroshot.wiki_task import TASK, build_documents, write_task  # noqa: E402
from tests.tiny import WORDS, make_tiny_family, make_tiny_llama, sample_text  # noqa: E402

MAX_POS = 32  # short, so that long requests are truncated from the left and rolling windows roll

REQUESTS = [
    ("the quick brown", " fox jumps"),
    ("", "the lazy dog"),  # empty context: the prefix (BOS) token conditions
    ("a lazy dog ", "jumps over"),  # trailing space moves to the continuation
    ("seven wizards", "."),
    (sample_text(60, seed=3), " the old town square"),  # longer than MAX_POS: cut from the left
    ("many people watch from", " windows above"),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("zs") / "model", max_pos=MAX_POS)


@pytest.fixture(scope="module")
def hflm(model_dir):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(model_dir), device="cpu", dtype="float32", batch_size=1)


def streamed_lm(model_dir, batch_size=1, **kw):
    from transformers import AutoTokenizer

    from lowmem_gblm.zeroshot.lm import StreamedLM

    return StreamedLM(StreamedModel.open(model_dir), AutoTokenizer.from_pretrained(str(model_dir)),
                      torch.device("cpu"), torch.float32, batch_size=batch_size, **kw)


def instances(kind, args):
    from lm_eval.api.instance import Instance

    return [Instance(kind, {}, a, k) for k, a in enumerate(args)]


def greedy_requests(model_dir, n=3):
    """Token-level requests whose continuation is (partly) the full model's greedy choice: is_greedy True and False."""
    from transformers import AutoModelForCausalLM

    full = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(5)
    out = []
    for k in range(n):
        ctx = torch.randint(2, 300, (6 + 3 * k,), generator=g).tolist()
        cont = []
        with torch.no_grad():
            for _ in range(3):
                cont.append(int(full(torch.tensor([ctx + cont])).logits[0, -1].argmax()))
        out.append((None, ctx, cont))
        out.append((None, ctx, cont[:2] + [(cont[2] + 1) % 300]))  # last token not the argmax
    return out


@pytest.mark.parametrize("batch_size", [1, 3])
def test_loglikelihood_matches_hflm(model_dir, hflm, batch_size):
    lm = streamed_lm(model_dir, batch_size)
    assert lm.max_length == hflm.max_length == MAX_POS and lm.prefix_token_id == hflm.prefix_token_id
    reqs = instances("loglikelihood", REQUESTS)
    ref, got = hflm.loglikelihood(reqs), lm.loglikelihood(reqs)
    tokens = greedy_requests(model_dir)
    ref += hflm._loglikelihood_tokens(tokens)
    got += lm._loglikelihood_tokens(tokens)
    assert len(got) == len(ref) == len(REQUESTS) + len(tokens)
    for (a, greedy_a), (b, greedy_b) in zip(ref, got, strict=True):
        assert b == pytest.approx(a, abs=1e-4)
        assert greedy_a == greedy_b
    assert {g for _, g in got} == {True, False}


@pytest.mark.parametrize("kind", ["mistral_sliding", "gemma3"])
def test_other_families_match_hflm(model_dir, tmp_path, kind):
    """Sliding-window attention (right padding and the window masks) and Gemma's scaled embedding with local /
    global layers: the same log-likelihoods and is_greedy as HFLM (the tiny tokenizer copied in)."""
    import shutil

    from lm_eval.models.huggingface import HFLM

    path = make_tiny_family(tmp_path / kind, kind)
    for f in [*model_dir.glob("tokenizer*"), *model_dir.glob("special_tokens_map.json")]:
        shutil.copy(f, path)
    hf = HFLM(pretrained=str(path), device="cpu", dtype="float32", batch_size=1)
    lm = streamed_lm(path, batch_size=3)
    reqs, tokens = instances("loglikelihood", REQUESTS), greedy_requests(path)
    ref = hf.loglikelihood(reqs) + hf._loglikelihood_tokens(tokens)
    got = lm.loglikelihood(reqs) + lm._loglikelihood_tokens(tokens)
    for (a, greedy_a), (b, greedy_b) in zip(ref, got, strict=True):
        assert b == pytest.approx(a, abs=1e-4) and greedy_a == greedy_b


def test_loglikelihood_rolling_matches_hflm(model_dir, hflm):
    texts = [(sample_text(40, seed=4),), ("the quick brown fox",), (sample_text(15, seed=6),)]
    lm = streamed_lm(model_dir, batch_size=2)
    ref, got = hflm.loglikelihood_rolling(instances("loglikelihood_rolling", texts)), \
        lm.loglikelihood_rolling(instances("loglikelihood_rolling", texts))
    assert len(lm.tok_encode(texts[0][0])) > 3 * MAX_POS  # several rolling windows
    assert got == pytest.approx(ref, abs=1e-4)


def test_generate_until_refused(model_dir):
    lm = streamed_lm(model_dir)
    reqs = instances("generate_until", [("the quick", {"until": ["\n"]})])
    with pytest.raises(UsageError, match="generate_until is not supported by the streamed model"):
        lm.generate_until(reqs)


def test_batches_passes_and_padding_do_not_change_scores(model_dir):
    """Right padding: a request alone (no padding) scores as in a batch padded to a longer one, and equals
    the full transformers model run on the unpadded request; batch size and pass size change nothing."""
    from transformers import AutoModelForCausalLM

    model = StreamedModel.open(model_dir)
    g = torch.Generator().manual_seed(1)
    reqs = [torch.randint(0, 320, (n,), generator=g).tolist() for n in (5, 30, 12, 9, 21, 2, 17)]
    conts = [2, 10, 1, 4, 3, 1, 5]
    alone = [streamed_loglikelihoods(model, [r], [c], "cpu", torch.float32)[0]
             for r, c in zip(reqs, conts, strict=True)]
    for batch_size, pass_tokens in ((1, 1 << 18), (3, 1 << 18), (7, 1 << 18), (3, 40)):
        got = streamed_loglikelihoods(model, reqs, conts, "cpu", torch.float32, batch_size, pass_tokens)
        for (a, ga), (b, gb) in zip(alone, got, strict=True):
            assert b == pytest.approx(a, abs=1e-5) and ga == gb
    full = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    for r, c, (logp, _) in zip(reqs, conts, alone, strict=True):
        with torch.no_grad():
            lp = torch.log_softmax(full(torch.tensor([r[:-1]])).logits[0, len(r) - 1 - c:], dim=-1)
        assert logp == pytest.approx(float(lp.gather(1, torch.tensor(r[-c:])[:, None]).sum()), abs=1e-4)


def test_plan_batches():
    passes = plan_batches([3, 9, 5, 9, 1], batch_size=2, pass_tokens=20)
    assert [[(b.members, b.length) for b in p] for p in passes] == [[((1, 3), 9)], [((2, 0), 5), ((4,), 1)]]
    assert len(plan_batches([4] * 6, 1, 1)) == 6  # a batch larger than the budget still gets its own pass


def synthetic_summaries(path, n=300):
    """A summaries JSON in the wiki-offline format: two sentences per article, from the tiny vocabulary."""
    g = torch.Generator().manual_seed(7)
    arts = {}
    for k in range(n):
        words = [WORDS[i] for i in torch.randint(len(WORDS), (16,), generator=g).tolist()]
        arts[f"Article {k}"] = {"extract": f"The {' '.join(words[:8])}. The {' '.join(words[8:])}."}
    path.write_text(json.dumps(arts))
    return path


def test_wiki_task_is_deterministic(tmp_path):
    from lowmem_gblm.calib.wiki import read_articles

    arts = read_articles(synthetic_summaries(tmp_path / "s.json"))
    a, b = build_documents(arts, seed=0), build_documents(arts, seed=0)
    assert a == b and a != build_documents(arts, seed=1) and len(a) >= 8
    for doc in a:
        assert len(doc["choices"]) == 4 and doc["choices"][doc["label"]] == arts[doc["title"]].split(". ", 1)[1]
    res = CliRunner().invoke(app, ["wiki-task", str(tmp_path / "cli"), "--source", str(tmp_path / "s.json"),
                                   "--max-docs", "5"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "cli" / f"{TASK}.json").read_text()) == a[:5]
    assert f"test: \"{(tmp_path / 'cli' / TASK).resolve()}.json\"" in (tmp_path / "cli" / f"{TASK}.yaml").read_text()


def test_accuracy_matches_hflm_and_cli(model_dir, hflm, tmp_path, calib_text):
    """The local multiple-choice task: lm-eval's own HFLM and `lowmem-gblm eval --tasks` give the same accuracies
    (with --data too: perplexity and accuracy in one JSON)."""
    from lm_eval import simple_evaluate

    from lowmem_gblm.zeroshot.run import task_manager, task_metrics

    folder = tmp_path / "tasks"
    write_task(folder, synthetic_summaries(tmp_path / "s.json"), seed=0, max_docs=8)
    ref = task_metrics(simple_evaluate(model=hflm, tasks=[TASK], limit=8, log_samples=False,
                                       task_manager=task_manager((TASK,), str(folder))))[TASK]
    res = CliRunner().invoke(app, ["eval", str(model_dir), "--tasks", TASK, "--include-path", str(folder),
                                   "--limit", "8", "--batch-size", "3", "--data", str(calib_text), "--seqlen", "16",
                                   "--max-windows", "2", "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    got = out["tasks"][TASK]
    assert got["samples"] == ref["samples"] == 8
    for key in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr"):
        assert got[key] == ref[key], key
    assert {"ppl", "nll", "tokens", "sparsity", "lm_eval"} <= out.keys()
    assert [p["phase"] for p in out["phases"]] == ["eval", "zeroshot"]


def test_missing_lm_eval_is_a_clear_error(monkeypatch, model_dir):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    with pytest.raises(UsageError, match=INSTALL_HINT.replace("[", r"\[").replace("]", r"\]")):
        require_lm_eval()
    res = CliRunner().invoke(app, ["eval", str(model_dir), "--tasks", "arc_easy", "--device", "cpu"])
    assert res.exit_code == 2 and INSTALL_HINT in res.stderr


def test_eval_needs_data_or_tasks(model_dir):
    runner = CliRunner()
    res = runner.invoke(app, ["eval", str(model_dir)])
    assert res.exit_code == 2 and "--data (perplexity) and/or --tasks" in res.stderr
    res = runner.invoke(app, ["eval", str(model_dir), "--data", "x.txt", "--limit", "3"])
    assert res.exit_code == 2 and "--limit applies to --tasks" in res.stderr
