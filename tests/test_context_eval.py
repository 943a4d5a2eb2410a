"""Context evaluations: loss by position against a direct computation, extrapolation over the same
tokens at every length, RoPE tables lengthened without changing the trained positions, the
per-document in-context test against the task file and a direct scoring, and the two commands
(apps.mosaics.context_eval, apps.mosaics.compare) end to end on tiny models of both apps (dense, v1, v2)."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from apps.main.transformer import LMTransformer, LMTransformerArgs
from apps.registry import APPS, app_of_yaml
from lingua.args import ConfigError, InputError
from lingua.data import DataArgs, iter_validation_batches
from lingua.evaluation.extrapolation import ExtrapolationArgs, bucket_means, extrapolation, position_losses
from lingua.evaluation.in_context import InContextArgs, build_items, in_context_accuracy, read_stories
from lingua.synthetic import make_story, story_indices, write_corpus
from lingua.tokenizer import TokenizerArgs, build_tokenizer

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = str(REPO / "tokenizer/stories_sp2k.model")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("context_data")
    write_corpus(root, "stories", n_train=40, n_val=12, n_chunks=1, seed=0)
    return root


def data_args(root: Path, seq_len: int) -> DataArgs:
    return DataArgs(root_dir=str(root), seq_len=seq_len, tokenizer=TokenizerArgs(name="sp", path=TOKENIZER))


def tiny_dense(max_seqlen: int, seed: int = 0) -> LMTransformer:
    args = LMTransformerArgs(dim=32, n_layers=2, n_heads=4, vocab_size=2000, max_seqlen=max_seqlen, multiple_of=16)
    torch.manual_seed(seed)
    model = LMTransformer(args)
    model.init_weights()
    return model.eval()


def test_position_losses_equal_a_direct_computation(data_dir):
    model = tiny_dense(32)
    data = data_args(data_dir, 32)
    curve, windows = position_losses(model, iter_validation_batches(data, "stories", 3, 2), torch.device("cpu"))
    tokens = torch.from_numpy(np.concatenate(list(iter_validation_batches(data, "stories", 3, 2))))
    with torch.no_grad():
        direct = F.cross_entropy(model(tokens[..., 0]).transpose(1, 2), tokens[..., 1], reduction="none").mean(0)
    assert windows == 6 and curve.shape == (32,)
    torch.testing.assert_close(torch.from_numpy(curve).float(), direct, rtol=1e-5, atol=1e-5)
    assert bucket_means(np.arange(10.0), 4) == [{"start": 0, "end": 4, "loss": 1.5}, {"start": 4, "end": 8, "loss": 5.5}, {"start": 8, "end": 10, "loss": 8.5}]


def test_every_length_reads_the_same_tokens(data_dir):
    """A model whose loss depends only on the target token: the mean loss is the same at every
    length exactly when every length scores the same tokens."""
    table = torch.randn(2000, 2000, generator=torch.Generator().manual_seed(0))
    unigram = lambda tokens: table[torch.zeros_like(tokens)]  # noqa: E731  same logits everywhere
    result = extrapolation(unigram, data_args(data_dir, 16), ExtrapolationArgs(factors=[4, 1, 2], windows=3, batch_size=2), torch.device("cpu"))
    lengths = result["sources"]["stories"]
    assert [(x["factor"], x["seq_len"], x["windows"]) for x in lengths] == [(1, 16, 12), (2, 32, 6), (4, 64, 3)]
    assert result["bucket"] == 4 and len(lengths[2]["buckets"]) == 16 and lengths[0]["loss_beyond_train"] is None
    assert lengths[0]["loss"] == pytest.approx(lengths[1]["loss"], rel=1e-9) == pytest.approx(lengths[2]["loss"], rel=1e-9)
    beyond = np.mean(lengths[2]["loss_by_position"][16:])
    assert lengths[2]["loss_beyond_train"] == pytest.approx(beyond)
    with pytest.raises(InputError, match=r"hold \d+ windows of 16 tokens, 4000 needed; lower extrapolation.windows"):
        extrapolation(unigram, data_args(data_dir, 16), ExtrapolationArgs(factors=[1, 4], windows=1000), torch.device("cpu"))
    with pytest.raises(ConfigError, match="extrapolation.factors"):
        ExtrapolationArgs(factors=[1, 1])
    with pytest.raises(ConfigError, match="each must divide the largest"):
        ExtrapolationArgs(factors=[2, 3])


def test_longer_rope_tables_leave_the_trained_positions_unchanged():
    short, long = tiny_dense(16), tiny_dense(64)
    long.load_state_dict(short.state_dict())
    tokens = torch.randint(0, 2000, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(long(tokens), short(tokens), rtol=0, atol=0)
    main, mosaics = APPS["main"], APPS["mosaics"]
    assert main.longer_context(short.args, 64) == {"max_seqlen": 64} and main.longer_context(long.args, 16) == {}
    assert mosaics.longer_context(None, 10**6) == {}


def test_stories_and_shots_follow_the_task_file():
    args = InContextArgs(shots=[0, 1, 2])
    stories = read_stories(args.task_file)
    assert len(stories) == 100
    for (story, questions), index in zip(stories[:3], story_indices("test", 3)):
        truth = make_story(0, index)
        assert story == truth.body and [q.line for q in questions] == [q.line for q in truth.questions]
    items = build_items(stories, args)
    usable = [s for s in stories if len(s[1]) >= 3]
    assert len(items) == 3 * sum(len(q) for _, q in usable)
    docs = [json.loads(line) for line in Path(args.task_file).read_text().splitlines()]
    # The last question of a story asked after the story's other questions in order is the task's own context.
    story, questions = usable[0]
    k = len(questions) - 1
    ctx = next(d["ctx"] for d in docs if d["ctx"].startswith(story) and d["id"].endswith(f"-{k}"))
    if k in args.shots:
        assert (k, ctx, questions[k]) in items
    assert (0, story + "\n\n" + questions[0].prompt, questions[0]) in items
    with pytest.raises(InputError, match="no story has 9 questions"):
        build_items(stories, InContextArgs(shots=[0, 8]))


def test_a_malformed_task_file_is_one_error_naming_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    good = Path(InContextArgs().task_file).read_text().splitlines()[0]
    bad.write_text(good + "\n" + json.dumps({"id": "7-x", "ctx": "story", "endings": ["a"], "label": 0}) + "\n")
    with pytest.raises(InputError, match=r"bad.jsonl:2: not a synthetic_mc doc"):
        read_stories(bad)
    with pytest.raises(InputError, match="does not exist"):
        read_stories(tmp_path / "missing.jsonl")


def test_in_context_accuracy_equals_direct_scoring():
    tokenizer = build_tokenizer("sp", TOKENIZER)
    args = InContextArgs(shots=[0, 2], limit=1)
    items = build_items(read_stories(args.task_file), args)
    model = tiny_dense(1024, seed=3)
    result = in_context_accuracy(model, tokenizer, items, args, torch.device("cpu"))
    expected = {0: [], 2: []}
    for k, context, question in items:
        scores = []
        for ending in question.endings:
            ctx, whole = tokenizer.encode(context, add_bos=True), tokenizer.encode(f"{context} {ending}", add_bos=True)
            with torch.no_grad():
                logprobs = model(torch.tensor([whole[:-1]]))[0].double().log_softmax(-1)
            scores.append(sum(float(logprobs[p - 1, whole[p]]) for p in range(len(ctx), len(whole))))
        expected[k].append(int(np.argmax(scores)) == question.label)
    assert result["stories"] == 1 and result["questions"] == len(expected[0])
    assert [s["acc"] for s in result["shots"]] == [pytest.approx(np.mean(expected[0])), pytest.approx(np.mean(expected[2]))]


def test_compare_trains_both_apps_and_writes_the_table(data_dir, tmp_path, monkeypatch):
    from apps.mosaics import compare, context_eval
    from apps.mosaics.context_eval import ContextEvalArgs
    from lingua.args import load_config

    monkeypatch.chdir(REPO)
    shared = [f"data.root_dir={data_dir}", "steps=2", "data.seq_len=32", "data.batch_size=2", "data.load_async=false",
              "validation.every=0", "checkpoint.dump.every=2", "logging.freq=1"]
    committed = load_config(compare.CompareArgs, str(REPO / "apps/mosaics/configs/compare_debug.yaml"))
    # Every committed run trains here at a tiny size: a run added to the config needs its line.
    tiny = {"dense": ["model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.weight_tying=true", "model.max_seqlen=32"],
            "v1": ["model.dim=32", "model.n_layers=1", "model.pmem_size=16"],
            "v2": ["model.dim=32", "model.n_layers=1", "model.v2.ffn_dim=32", "model.v2.short_window=8",
                   "model.v2.long_offset_min=2", "model.v2.long_offset_max=8", "model.v2.long_offset_eval=4"]}
    assert [run.name for run in committed.runs] == list(tiny), "give each run of compare_debug.yaml tiny overrides here"
    assert "model.weight_tying=true" in committed.runs[0].overrides
    evaluation = ContextEvalArgs(ExtrapolationArgs(windows=2), InContextArgs(shots=[0, 1], limit=1), device="cpu")
    args = dataclasses.replace(
        committed, dump_dir=str(tmp_path / "cmp"), overrides=shared, eval=evaluation,
        runs=[dataclasses.replace(run, overrides=tiny[run.name]) for run in committed.runs],
    )
    rows = compare.main(args)
    text = (tmp_path / "cmp" / "compare.md").read_text()
    assert [row["name"] for row in rows] == list(tiny) and "| dense | main |" in text and "| v1 | mosaics |" in text
    assert "| v2 | mosaics |" in text
    dense = json.loads((tmp_path / "cmp" / "dense" / "context_eval" / "context_eval.json").read_text())
    longest = dense["in_context"]["longest_sequence"]  # a story and its questions: longer than 4 x 32
    assert dense["app"] == "main" and dense["train_seq_len"] == 32 and dense["length_overrides"] == {"max_seqlen": longest} and longest > 128
    assert "val loss 4x" in text and "acc_norm 1 shots" in text and f"dense: evaluated with model.max_seqlen={longest} (same weights" in text
    assert [x["seq_len"] for x in dense["extrapolation"]["sources"]["stories"]] == [32, 64, 128]
    assert dense["in_context"]["longer_than_training"] == 1.0
    v2 = json.loads((tmp_path / "cmp" / "v2" / "context_eval" / "context_eval.json").read_text())
    assert v2["app"] == "mosaics" and v2["length_overrides"] == {} and v2["train_seq_len"] == 32  # no position limit
    for name in ("compare.json", "extrapolation.png", "in_context.png", "v1/context_eval/extrapolation_stories.png", "v2/context_eval/extrapolation_stories.png"):
        assert (tmp_path / "cmp" / name).stat().st_size > 0
    with pytest.raises(ConfigError, match="already holds checkpoints; pass train=false"):
        compare.main(args)
    # The single-checkpoint command, on the v1 run, from its documented entry point.
    result = context_eval.main(context_eval.ContextEvalCommand(ckpt=str(tmp_path / "cmp" / "v1"), in_context=None, extrapolation=ExtrapolationArgs(factors=[1, 2], windows=1)))
    assert result["app"] == "mosaics" and "in_context" not in result and (tmp_path / "cmp" / "v1" / "context_eval" / "context_eval.json").is_file()


def test_config_errors_name_the_problem(tmp_path):
    from apps.mosaics.compare import CompareArgs, CompareRun
    from apps.mosaics.compare import main as compare_main

    with pytest.raises(ConfigError, match="exactly one of config"):
        CompareArgs(runs=[CompareRun(name="a", config="x.yaml", ckpt="y")])
    with pytest.raises(InputError, match=r"runs\[0\].ckpt='.*nothing' does not exist"):
        compare_main(CompareArgs(runs=[CompareRun(name="a", ckpt=str(tmp_path / "nothing"))]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"runs\[0\].ckpt='.*empty' holds no checkpoint"):
        compare_main(CompareArgs(runs=[CompareRun(name="a", ckpt=str(tmp_path / "empty"))]))
    with pytest.raises(ConfigError, match="distinct name"):
        CompareArgs(runs=[CompareRun(name="a", ckpt="x"), CompareRun(name="a", ckpt="y")])
    both = tmp_path / "empty.yaml"
    both.write_text("steps: 3\n")
    with pytest.raises(ConfigError, match=r"both apps accept it \(main, mosaics\)"):
        app_of_yaml(str(both), [])
    assert app_of_yaml(str(REPO / "apps/mosaics/configs/debug.yaml"), [])[0].name == "mosaics"
    assert app_of_yaml(str(REPO / "apps/main/configs/debug.yaml"), [])[0].name == "main"
    with pytest.raises(ConfigError, match="no app accepts it"):
        app_of_yaml(str(REPO / "apps/main/configs/debug.yaml"), ["model.pmem_size=3"])
