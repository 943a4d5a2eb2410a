"""Evaluation: the lm-eval adapter against direct forward passes, rolling windows, generation,
offline task files, the eval command end to end, and a trained debug model above chance."""

import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance

from apps.main.eval import checkpoint_step_and_run, model_generate_fn, model_logits_fn
from apps.main.transformer import LMTransformer, LMTransformerArgs
from lingua.args import ConfigError, InputError, config_from_dict, load_config
from lingua.data import DataArgs, iter_validation_batches
from lingua.evaluation import (
    EvalArgs,
    GenerationOptions,
    HarnessArgs,
    LinguaLM,
    ValidationEvalArgs,
    generate_by_recompute,
    load_tasks,
    rolling_windows,
    validation_metrics,
)
from lingua.synthetic import write_corpus
from lingua.tokenizer import ByteTokenizer

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("make_eval_tasks", REPO / "setup" / "make_eval_tasks.py")
make_eval_tasks = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_eval_tasks)

MAX_LEN = 24


def tiny_model(seed: int = 0, max_seqlen: int = MAX_LEN) -> LMTransformer:
    tokenizer = ByteTokenizer()
    args = LMTransformerArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tokenizer.n_words, max_seqlen=max_seqlen, multiple_of=16)
    torch.manual_seed(seed)
    model = LMTransformer(args, document_delimiters=(tokenizer.bos_id, tokenizer.eos_id))
    model.init_weights()
    with torch.no_grad():  # sharpen the output so greedy choices are not near-ties
        model.output.weight.mul_(20)
    return model.eval()


def requests(kind: str, args_list: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, args, i) for i, args in enumerate(args_list)]


def direct_loglikelihood(model: LMTransformer, context: str, continuation: str) -> tuple[float, bool]:
    """Sum of log p(continuation token | everything before it) from one forward pass. As in
    lm-eval, trailing spaces of the context are scored as part of the continuation."""
    tok = ByteTokenizer()
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    ctx, cont = tok.encode(context, add_bos=True), tok.encode(continuation)
    tokens = (ctx + cont)[-(model.args.max_seqlen + 1) :]
    with torch.no_grad():
        logprobs = model(torch.tensor([tokens[:-1]]))[0].double().log_softmax(-1)
    positions = range(len(tokens) - 1 - len(cont), len(tokens) - 1)
    total = sum(float(logprobs[p, tokens[p + 1]]) for p in positions)
    greedy = all(int(logprobs[p].argmax()) == tokens[p + 1] for p in positions)
    return total, greedy


PAIRS = [
    ("", "a"),  # empty context: the first continuation token is predicted from BOS
    ("The cat", " sat"),
    ("The cat ", "sat"),  # a trailing space moves to the continuation
    ("x", "y"),
    ("Once upon a time there was a very long context indeed", " that is cut"),  # left-truncated
    ("Q: Where is the apple? A:", " in the basket"),
    ("ab", "cdefghijklmnopqrstu"),
]


def test_loglikelihood_equals_direct_forward_pass():
    model = tiny_model()
    lm = LinguaLM(ByteTokenizer(), model_logits_fn(model), MAX_LEN, batch_size=3)
    results = lm.loglikelihood(requests("loglikelihood", PAIRS))
    for (context, continuation), (logprob, greedy) in zip(PAIRS, results):
        expected, expected_greedy = direct_loglikelihood(model, context, continuation)
        assert logprob == pytest.approx(expected, rel=1e-5, abs=1e-4), (context, continuation)
        assert greedy == expected_greedy
        assert logprob < 0


def test_every_continuation_token_is_scored():
    """Chain rule: log p(xy | c) = log p(x | c) + log p(y | c x). Dropping the first continuation
    token (the public wrapper's off-by-one) breaks it."""
    model = tiny_model()
    lm = LinguaLM(ByteTokenizer(), model_logits_fn(model), MAX_LEN)
    (both, _), (first, _), (second, _) = lm.loglikelihood(requests("loglikelihood", [("hello", " wo"), ("hello", " w"), ("hello w", "o")]))
    assert both == pytest.approx(first + second, rel=1e-6)
    (one, _), (more, _) = lm.loglikelihood(requests("loglikelihood", [("abc", "d"), ("abc", "de")]))
    assert one != 0 and more < one


def test_batched_equals_one_by_one_in_request_order():
    model = tiny_model(seed=1)
    pairs = [(f"prompt {i} " + "z" * (i * 3 % 17), "x" * (1 + i % 5)) for i in range(11)] + PAIRS
    batched = LinguaLM(ByteTokenizer(), model_logits_fn(model), MAX_LEN, batch_size=4).loglikelihood(requests("loglikelihood", pairs))
    single = LinguaLM(ByteTokenizer(), model_logits_fn(model), MAX_LEN, batch_size=1)
    for pair, result in zip(pairs, batched):
        alone = single.loglikelihood(requests("loglikelihood", [pair]))[0]
        assert result[0] == pytest.approx(alone[0], rel=1e-5, abs=1e-4)
        assert result[1] == alone[1]


def test_continuation_longer_than_the_model_is_refused():
    lm = LinguaLM(ByteTokenizer(), model_logits_fn(tiny_model()), MAX_LEN)
    with pytest.raises(ValueError, match="does not fit"):
        lm.loglikelihood(requests("loglikelihood", [("a", "b" * (MAX_LEN + 1))]))


@pytest.mark.parametrize("n,m", [(0, 4), (1, 4), (4, 4), (5, 4), (63, 16), (64, 16), (65, 16), (7, 1)])
def test_rolling_windows_cover_every_token_once(n, m):
    scored = []
    for start, first, end in rolling_windows(n, m):
        assert end - 1 - start <= m and start < first < end  # the input fits, every scored token has context
        scored += range(first, end)
    assert scored == list(range(1, n + 1))
    if len(rolling_windows(n, m)) > 1:
        assert all(end - 1 - start == m for start, _, end in rolling_windows(n, m)[1:])  # full context after the first


def test_loglikelihood_rolling_sums_every_token_once():
    """A bigram 'model' (logits depend on the current token only) makes the exact answer known at
    any window layout: the sum of log p(t_i | t_{i-1}) over BOS + text."""
    tokenizer = ByteTokenizer()
    torch.manual_seed(0)
    table = torch.randn(tokenizer.n_words, tokenizer.n_words, dtype=torch.float64)
    texts = ["", "a", "short text", "a much longer text that needs several windows of sixteen tokens " * 3]
    lm = LinguaLM(tokenizer, lambda tokens: table[tokens], max_length=16, batch_size=3)
    results = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(t,) for t in texts]))
    logprobs = table.log_softmax(-1)
    for text, result in zip(texts, results):
        tokens = tokenizer.encode(text, add_bos=True)
        expected = sum(float(logprobs[a, b]) for a, b in zip(tokens[:-1], tokens[1:]))
        assert result == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_rolling_equals_loglikelihood_from_empty_context_when_short():
    model = tiny_model()
    lm = LinguaLM(ByteTokenizer(), model_logits_fn(model), MAX_LEN)
    rolling = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [("short one",)]))[0]
    assert rolling == pytest.approx(direct_loglikelihood(model, "", "short one")[0], rel=1e-5)


def test_generate_until_kv_cache_equals_recompute_and_stops():
    model, tokenizer = tiny_model(seed=2, max_seqlen=48), ByteTokenizer()
    prompts = ["a", "hello there", "The quick brown fox", "x"]
    free = generate_by_recompute(model_logits_fn(model), tokenizer, 48, torch.device("cpu"))(prompts, GenerationOptions(max_new_tokens=10))
    lm = LinguaLM(tokenizer, model_logits_fn(model), 48, generate_fn=model_generate_fn(model, tokenizer), batch_size=3)
    fallback = LinguaLM(tokenizer, model_logits_fn(model), 48, batch_size=2)
    kwargs = [{"until": [], "max_gen_toks": 10}, {"until": [free[1][2:4]], "max_gen_toks": 10}, {"max_gen_toks": 3, "until": "\n"}, {"until": [], "max_gen_toks": 10}]
    reqs = requests("generate_until", list(zip(prompts, kwargs)))
    outputs = lm.generate_until(reqs)
    assert outputs == fallback.generate_until(reqs)
    assert outputs[0] == free[0] and outputs[3] == free[3]
    assert outputs[1] == free[1][: free[1].index(free[1][2:4])]  # cut at the stop string
    assert outputs[2] == free[2][:3] or len(tokenizer.encode(outputs[2])) <= 3


def test_validation_metrics_match_a_direct_computation(tmp_path):
    write_corpus(tmp_path, "stories", n_train=4, n_val=6, n_chunks=1, seed=0)
    data = DataArgs(root_dir=str(tmp_path), seq_len=MAX_LEN, load_async=False)
    model = tiny_model()
    args = ValidationEvalArgs(max_batches=3, batch_size=5)
    metrics = validation_metrics(model_logits_fn(model), data, args, torch.device("cpu"))
    nll, count = 0.0, 0
    for batch in iter_validation_batches(data, "stories", 5, 3):
        tokens = torch.from_numpy(batch)
        with torch.no_grad():
            logprobs = model(tokens[..., 0]).double().log_softmax(-1)
        nll -= float(logprobs.gather(-1, tokens[..., 1:2]).sum())
        count += tokens[..., 1].numel()
    assert metrics["val/stories/tokens"] == count == 3 * 5 * MAX_LEN
    assert metrics["val/stories/loss"] == pytest.approx(nll / count, rel=1e-5)
    assert metrics["val/ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_task_files_match_their_generator():
    for name, docs in make_eval_tasks.task_files(100, 20).items():
        assert (REPO / "configs" / "tasks" / name).read_text(encoding="utf-8") == make_eval_tasks.render(docs), name
    mc = [json.loads(line) for line in (REPO / "configs/tasks/synthetic_mc.test.jsonl").open()]
    assert all(len(d["endings"]) == 4 and len(set(d["endings"])) == 4 and d["ctx"].endswith(" A:") for d in mc)
    labels = [d["label"] for d in mc]
    assert all(0.15 < labels.count(k) / len(labels) < 0.35 for k in range(4))  # no position bias to exploit


def test_eval_config_and_task_entries():
    cfg = load_config(EvalArgs, str(REPO / "apps/main/configs/eval.yaml"), ["harness.tasks=[synthetic_mc,{task: synthetic_qa, num_fewshot: 2}]"])
    assert cfg.harness.tasks == ["synthetic_mc", {"task": "synthetic_qa", "num_fewshot": 2}]
    assert load_config(EvalArgs, str(REPO / "apps/main/configs/eval.yaml")).harness.tasks[2] == {"task": "nq_open", "num_fewshot": 5}
    with pytest.raises(ConfigError, match=r"harness.tasks\[0\]"):
        HarnessArgs(tasks=[{"task": "x", "shots": 1}])
    with pytest.raises(ConfigError, match="harness.limit"):
        config_from_dict(EvalArgs, {"harness": {"limit": 0}})


@pytest.mark.parametrize("name", ["eval.yaml", "eval_zero_copy.yaml"])
def test_agi_test_2_configs_parse(name):
    cfg = load_config(EvalArgs, str(REPO / "agi_test/test_2/config" / name), ["harness.limit=5"])
    assert [t if isinstance(t, str) else t["task"] for t in cfg.harness.tasks] == ["hellaswag", "piqa", "nq_open"]


def test_missing_checkpoint_is_one_line_error(tmp_path):
    cli = subprocess.run(
        [sys.executable, "-m", "apps.main.eval", f"ckpt_dir={tmp_path / 'nothing'}", "harness.tasks=[synthetic_mc]"],
        cwd=REPO, capture_output=True, text=True,
    )
    assert cli.returncode == 2 and "nothing" in cli.stderr and "Traceback" not in cli.stderr


def test_local_tasks_load_offline_with_absolute_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative data_files must not depend on the current directory
    args = HarnessArgs(tasks=["synthetic_mc", {"task": "synthetic_qa", "num_fewshot": 2}], num_fewshot=1)
    tasks, _ = load_tasks(args, tmp_path / "cache")
    by_name = {t.config.task: t for t in tasks}
    assert by_name["synthetic_mc"].config.num_fewshot == 1 and by_name["synthetic_qa"].config.num_fewshot == 2
    assert len(by_name["synthetic_mc"].test_docs()) == 295


def test_hub_task_offline_fails_fast_naming_task_and_alternatives(monkeypatch):
    import lingua.evaluation.tasks as harness

    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(harness, "hub_unreachable_reason", lambda endpoint: "Name or service not known")
    with pytest.raises(InputError) as error:
        harness.check_tasks_available(HarnessArgs(tasks=["synthetic_mc", "hellaswag", {"task": "nq_open", "num_fewshot": 5}]))
    message = str(error.value)
    assert "hellaswag, nq_open" in message and "synthetic_mc,synthetic_qa" in message and "synthetic_mc," not in message.split("Offline")[0]
    harness.check_tasks_available(HarnessArgs(tasks=["synthetic_mc"]))  # local tasks never probe


# ----------------------------------------------------------------------------------------------
# A debug model trained on the stories, evaluated through the documented command
# ----------------------------------------------------------------------------------------------

CHANCE = 0.25  # synthetic_mc has 4 endings per question


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """apps/main/configs/debug.yaml (the documented debug run) trained 300 steps on the story corpus:
    the committed weights of tests/data/eval_debug_run (made by tests/data/make_eval_checkpoint.py),
    its data.root_dir pointed at the corpus it was trained on."""
    root = tmp_path_factory.mktemp("eval_run")
    write_corpus(root / "data", "stories", seed=0)  # the corpus the debug config synthesizes
    shutil.copytree(REPO / "tests/data/eval_debug_run", root / "run")
    params_file = root / "run/checkpoints/0000000300/consolidated/params.json"
    params = json.loads(params_file.read_text())
    params["dump_dir"], params["data"]["root_dir"] = str(root / "run"), str(root / "data")
    params_file.write_text(json.dumps(params))
    return root / "run"


@pytest.mark.slow
def test_eval_command_end_to_end_offline_and_above_chance(trained_run, tmp_path):
    """The documented command on the local tasks: results.json, results.md and the metrics line;
    the trained debug model beats chance on synthetic_mc."""
    out = tmp_path / "eval_out"
    cli = subprocess.run(
        [sys.executable, "-m", "apps.main.eval", "config=apps/main/configs/eval.yaml", f"ckpt_dir={trained_run}", f"dump_dir={out}",
         "harness.tasks=[synthetic_mc,synthetic_qa]", "validation.max_batches=2", "harness.batch_size=16"],
        cwd=REPO, capture_output=True, text=True, env={**__import__("os").environ, "HF_DATASETS_CACHE": str(tmp_path / "hf")},
    )
    assert cli.returncode == 0, cli.stderr[-3000:]
    record = json.loads((out / "eval" / "0000000300" / "results.json").read_text())
    mc, qa = record["harness"]["results"]["synthetic_mc"], record["harness"]["results"]["synthetic_qa"]
    assert record["step"] == 300 and record["harness"]["n-samples"]["synthetic_mc"]["effective"] == 295
    assert 0 <= qa["exact_match,remove_whitespace"] <= 1
    assert record["validation"]["val/stories/tokens"] == 2 * 8 * 256 and record["validation"]["val/loss"] < 2.5
    assert "| synthetic_mc |" in (out / "eval" / "0000000300" / "results.md").read_text()
    line = json.loads((out / "metrics.eval.jsonl").read_text().splitlines()[-1])
    assert line["step"] == 300 and line["eval/synthetic_mc/acc_norm"] == mc["acc_norm,none"]
    print(f"synthetic_mc acc={mc['acc,none']:.3f} acc_norm={mc['acc_norm,none']:.3f}; synthetic_qa exact_match={qa['exact_match,remove_whitespace']:.3f}")
    # 295 questions: chance accuracy has a standard deviation of 0.025; ask for more than 1.6 of them.
    assert mc["acc_norm,none"] > CHANCE + 0.04


@pytest.mark.slow
def test_checkpoint_step_and_run_folder(trained_run):
    assert checkpoint_step_and_run(str(trained_run)) == (300, trained_run)
    assert checkpoint_step_and_run(str(trained_run / "checkpoints" / "0000000300")) == (300, trained_run)
