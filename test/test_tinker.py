"""The official `tinker` SDK against a live server on the tiny model: training, sampling, state, losses, REST."""

import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator

import httpx
import pytest
import tinker
import torch
from peft import PeftModel
from pg import both_backends
from tinker import types
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import TINY_NAME, start_server, stop_server
from util.settings import PROJECT_ROOT

KEY = "tinker-test-key"
SDK_KEY = f"tml-{KEY}"  # the SDK insists on the prefix; the server accepts the key with or without it
# One fixed sequence: after the prompt, a model must learn to continue with TARGET.
PROMPT = [11, 220, 3056, 1092, 5078]
TARGET = [803, 4127, 2954, 611, 9123, 77]
TEXT = "The capital of France is Paris. The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_root) -> Iterator[str]:
    """A real server with an API key; runs are allowed generously since each test starts its own."""
    extra = {"auth": {"api_keys": [KEY]}, "runs": {"max_runs": 12}}
    url, proc = start_server(tmp_path_factory.mktemp("tinker_server"), tiny_model_root, extra)
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def service(server) -> Iterator[tinker.ServiceClient]:
    """One SDK session for the module."""
    sc = tinker.ServiceClient(base_url=server, api_key=SDK_KEY)
    yield sc
    sc.close("success").result()


@pytest.fixture(scope="module")
def tok(tiny_model_root) -> AutoTokenizer:
    """The tiny model's (real SmolLM2) tokenizer."""
    return AutoTokenizer.from_pretrained(tiny_model_root / "base" / TINY_NAME)


def sft_datum(ids: list[int], prompt_len: int = 0) -> types.Datum:
    """Predict ids[1:] from ids[:-1], weighting only tokens after the prompt."""
    weights = [0.0 if i + 1 < prompt_len else 1.0 for i in range(len(ids) - 1)]
    return types.Datum(
        model_input=types.ModelInput.from_ints(ids[:-1]),
        loss_fn_inputs={"target_tokens": ids[1:], "weights": weights},
    )


def train(tc: tinker.TrainingClient, data: list[types.Datum], steps: int, lr: float = 2e-2) -> list[float]:
    """forward_backward + optim_step submitted back to back (pipelined), `steps` times; the losses."""
    out = []
    for _ in range(steps):
        fb = tc.forward_backward(data, "cross_entropy")
        opt = tc.optim_step(types.AdamParams(learning_rate=lr))
        out.append(fb.result().metrics["loss:sum"])
        opt.result()
    return out


def loss_of(tc: tinker.TrainingClient, data: list[types.Datum]) -> float:
    """The cross-entropy sum under the current weights (a forward pass, no gradients)."""
    return tc.forward(data, "cross_entropy").result().metrics["loss:sum"]


@pytest.fixture(scope="module")
def trained(service) -> tuple[tinker.TrainingClient, list[float]]:
    """One LoRA model trained to continue PROMPT with TARGET (shared: each run is a worker process)."""
    tc = service.create_lora_training_client(base_model=TINY_NAME, rank=8, seed=3).result()
    losses = train(tc, [sft_datum(PROMPT + TARGET, prompt_len=len(PROMPT))], steps=15, lr=1e-2)
    return tc, losses


def test_capabilities_and_health(server, service):
    caps = service.get_server_capabilities()
    assert TINY_NAME in [m.model_name for m in caps.supported_models]
    assert httpx.get(f"{server}/api/v1/healthz", headers={"X-API-Key": SDK_KEY}).json() == {"status": "ok"}
    assert httpx.get(f"{server}/api/v1/healthz").status_code == 401


def test_training_loss_decreases_and_sampler_learns_the_continuation(trained, tok):
    tc, losses = trained
    info = tc.get_info()
    assert info.model_data.model_name == TINY_NAME and info.lora_rank == 8
    assert losses[-1] < losses[0] * 0.5, losses
    sampler = tc.save_weights_and_get_sampling_client().result()
    prompt, want = PROMPT, TARGET[:3]
    res = sampler.sample(types.ModelInput.from_ints(prompt), 2, types.SamplingParams(max_tokens=3, temperature=0.0))
    res = res.result()
    assert len(res.sequences) == 2
    for seq in res.sequences:
        assert seq.tokens == want, (tok.decode(seq.tokens), tok.decode(want))
        assert len(seq.logprobs) == len(seq.tokens) and all(lp <= 0 for lp in seq.logprobs)
    # Sampling parameters: several random samples with a seed, top_k / top_p, stop at a token.
    params = types.SamplingParams(max_tokens=5, temperature=1.0, top_k=5, top_p=0.9, seed=7, stop=[want[2]])
    res = sampler.sample(types.ModelInput.from_ints(prompt), 3, params).result()
    assert len(res.sequences) == 3
    for seq in res.sequences:
        assert 1 <= len(seq.tokens) <= 5
        assert (seq.stop_reason == "stop") == (seq.tokens[-1] == want[2])


def test_compute_logprobs_equal_a_teacher_forced_forward(trained, tok):
    tc, _ = trained
    ids = tok.encode(TEXT)[:16]
    forward = tc.forward([sft_datum(ids)], "cross_entropy").result()
    teacher = forward.loss_fn_outputs[0]["logprobs"].data
    sampler = tc.save_weights_and_get_sampling_client().result()
    computed = sampler.compute_logprobs(types.ModelInput.from_ints(ids)).result()
    assert computed[0] is None and len(computed) == len(ids)
    assert computed[1:] == pytest.approx(teacher, abs=1e-4)
    res = sampler.sample(
        types.ModelInput.from_ints(ids),
        1,
        types.SamplingParams(max_tokens=1),
        include_prompt_logprobs=True,
        topk_prompt_logprobs=3,
    ).result()
    assert res.prompt_logprobs[1:] == pytest.approx(teacher, abs=1e-4)
    top = res.topk_prompt_logprobs
    assert top[0] is None and len(top[1]) == 3
    assert top[1][0][1] >= teacher[0] - 1e-4  # the best token is at least as likely as the actual one


def test_save_state_and_resume_with_optimizer_gives_the_same_next_step(service, trained, tok):
    data = [sft_datum(tok.encode(TEXT)[:20])]
    tc, _ = trained
    path = tc.save_state("resume-point").result().path
    assert path == f"tinker://{tc.model_id}/weights/resume-point"
    train(tc, data, steps=1, lr=1e-2)
    expected = loss_of(tc, data)
    resumed = service.create_training_client_from_state_with_optimizer(path).result()
    train(resumed, data, steps=1, lr=1e-2)
    assert loss_of(resumed, data) == pytest.approx(expected, abs=1e-5)
    resumed.load_state(path).result()  # weights only: Adam starts over, so the next step differs
    train(resumed, data, steps=1, lr=1e-2)
    assert abs(loss_of(resumed, data) - expected) > 1e-3


def rl_datum(ids: list[int], seed: int) -> types.Datum:
    """A hand-built RL datum: sampling logprobs near the model's, mixed-sign advantages, a ratio mask."""
    g = torch.Generator().manual_seed(seed)
    n = len(ids) - 1
    return types.Datum(
        model_input=types.ModelInput.from_ints(ids[:-1]),
        loss_fn_inputs={
            "target_tokens": ids[1:],
            "logprobs": (-10.5 + 0.6 * torch.randn(n, generator=g)).tolist(),
            "advantages": torch.randn(n, generator=g).tolist(),
            "sequence_ratio_mask": [0.0] * 2 + [1.0] * (n - 2),
        },
    )


def reference_loss(name: str, lp: torch.Tensor, inp: dict[str, torch.Tensor], cfg: dict[str, float]) -> torch.Tensor:
    """Each of Tinker's RL losses written out from its documented formula (summed over tokens)."""
    old, adv = inp["logprobs"], inp["advantages"]
    lo, hi = cfg.get("clip_low_threshold", 0.8), cfg.get("clip_high_threshold", 1.2)
    ratio = torch.exp(lp - old)
    if name == "importance_sampling":
        return -(ratio * adv).sum()
    if name == "ppo":
        return -torch.min(ratio * adv, torch.clamp(ratio, lo, hi) * adv).sum()
    if name == "cispo":
        return -(torch.clamp(ratio, lo, hi).detach() * lp * adv).sum()
    if name == "dro":
        return -(lp * adv - 0.5 * cfg.get("beta", 0.05) * (lp - old) ** 2).sum()
    if name == "gspo":
        mask = inp["sequence_ratio_mask"]
        s = torch.exp((mask * (lp - old)).sum() / mask.sum())
        w = s.detach() * torch.exp(lp - lp.detach())
        return -(mask * torch.min(w * adv, torch.clamp(w, lo, hi) * adv)).sum()
    raise AssertionError(name)


RL_CASES = [
    ("importance_sampling", {}),
    ("ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}),
    ("cispo", {}),
    ("dro", {"beta": 0.3}),
    ("gspo", {"clip_low_threshold": 0.5, "clip_high_threshold": 1.5}),
]


@pytest.mark.parametrize(("name", "cfg"), RL_CASES)
def test_rl_loss_gradient_matches_the_formula(name, cfg, settings, tok):
    """The worker's loss_step gradient (fp32) equals autograd through the formula written out here."""
    from entity.runs import RunRow
    from service.run_worker import RunState

    run = RunRow(
        id="grad-check",
        base_path=str(settings.base_model_path()),
        base_model=TINY_NAME,
        lora={"r": 4, "alpha": 8, "target_modules": "all-linear"},
        seed=0,
        steps=0,
        resume_from=None,
        resume_optimizer=0,
        vocab_size=len(tok),
    )
    state = RunState(run, settings)
    with torch.no_grad():  # non-zero B so every LoRA weight gets a gradient
        for p in state.params:
            p.normal_(0, 0.05)
    data = [rl_datum(tok.encode(TEXT)[:12], 0), rl_datum(tok.encode(TEXT)[5:14], 1)]
    request = {
        "loss_fn": name,
        "config": cfg,
        "forward_only": False,
        "data": [
            {"tokens": d.model_input.to_ints(), "inputs": {k: v.data for k, v in d.loss_fn_inputs.items()}}
            for d in data
        ],
    }
    result = state.loss_step(request)
    got = [p.grad.clone() for p in state.params]
    state.optimizer.zero_grad(set_to_none=True)
    total = torch.zeros(())
    for d in data:
        ids = torch.tensor([d.model_input.to_ints()])
        targets = torch.tensor(d.loss_fn_inputs["target_tokens"].data)
        lp = state.model(input_ids=ids).logits.float()[0].log_softmax(-1).gather(-1, targets[:, None])[:, 0]
        inputs = {k: torch.tensor(v.data, dtype=torch.float32) for k, v in d.loss_fn_inputs.items()}
        total = total + reference_loss(name, lp, inputs, cfg)
    total.backward()
    assert result["metrics"]["loss:sum"] == pytest.approx(float(total), abs=1e-5)
    for g, p in zip(got, state.params, strict=True):
        # The worker runs both examples as one padded batch, the reference one at a time: fp32 reduction order
        # differs, which moves single elements by about 1e-5 (relative 1e-4).
        torch.testing.assert_close(g, p.grad, rtol=2e-4, atol=5e-5)
    assert any(float(g.abs().max()) > 1e-6 for g in got)


def test_rl_losses_over_the_wire_report_the_formula_loss(trained, tok):
    """loss_fn_config reaches the server: each loss's loss:sum equals the formula on the returned logprobs."""
    tc, _ = trained
    data = [rl_datum(tok.encode(TEXT)[:12], 0), rl_datum(tok.encode(TEXT)[3:10], 1)]
    for name, cfg in RL_CASES:
        out = tc.forward(data, name, cfg).result()
        want = 0.0
        for d, o in zip(data, out.loss_fn_outputs, strict=True):
            lp = torch.tensor(o["logprobs"].data)
            inputs = {k: torch.tensor(v.data, dtype=torch.float32) for k, v in d.loss_fn_inputs.items()}
            want += float(reference_loss(name, lp, inputs, cfg))
        assert out.metrics["loss:sum"] == pytest.approx(want, rel=1e-4, abs=1e-4), name
    fb = tc.forward_backward(data, "ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1})
    opt = tc.optim_step(types.AdamParams(learning_rate=1e-3, beta2=0.99, eps=1e-8, grad_clip_norm=1.0))
    assert fb.result().metrics["loss:sum"] != 0 and opt.result() is not None


def test_forward_backward_custom_equals_cross_entropy(trained, tok):
    """From one saved state, a custom NLL step and a cross_entropy step give the same loss and the same weights."""
    tc, _ = trained
    data = [sft_datum(tok.encode(TEXT)[:16], prompt_len=4)]
    start = tc.save_state("before-custom").result().path

    def nll(batch: list[types.Datum], logprobs: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        weights = [torch.tensor(d.loss_fn_inputs["weights"].data) for d in batch]
        return sum(-(lp * w).sum() for lp, w in zip(logprobs, weights, strict=True)), {}

    custom = tc.forward_backward_custom(data, nll)
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    after_custom = loss_of(tc, data)
    tc.load_state_with_optimizer(start).result()
    ce = tc.forward_backward(data, "cross_entropy")
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    assert custom.result().metrics["loss:sum"] == pytest.approx(ce.result().metrics["loss:sum"], abs=1e-5)
    assert after_custom == pytest.approx(loss_of(tc, data), abs=1e-5)
    assert after_custom != pytest.approx(ce.result().metrics["loss:sum"], abs=1e-3)  # the step changed the weights


def test_rest_client_lists_runs_and_checkpoints_and_downloads_peft_weights(server, service, trained, tok, tmp_path):
    tc, _ = trained
    path = tc.save_state("final").result().path
    sampler_path = tc.save_weights_for_sampler("for-sampling").result().path
    rest = service.create_rest_client()
    runs = rest.list_training_runs(limit=100).result()
    assert tc.model_id in [r.training_run_id for r in runs.training_runs]
    run = rest.get_training_run(tc.model_id).result()
    assert run.base_model == TINY_NAME and run.lora_rank == 8
    cps = {c.tinker_path: c for c in rest.list_checkpoints(tc.model_id).result().checkpoints}
    assert cps[path].checkpoint_type == "training" and cps[sampler_path].checkpoint_type == "sampler"
    assert rest.get_weights_info_by_tinker_path(path).result().lora_rank == 8
    # `tinker checkpoint download` (the CLI seed 004 uses): export, signed per-file URLs, fetch.
    env = {**os.environ, "TINKER_BASE_URL": server, "TINKER_API_KEY": SDK_KEY, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "tinker.cli", "checkpoint", "download", path, "--output", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=PROJECT_ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    folder = tmp_path / path.replace("tinker://", "").replace("/", "_")
    base = AutoModelForCausalLM.from_pretrained(tok.name_or_path)
    PeftModel.from_pretrained(base, folder)
    # A tar.gz archive of the same checkpoint also loads with PEFT once extracted.
    url = f"{server}/api/v1/training_runs/{tc.model_id}/checkpoints/weights/final/archive"
    archive = tmp_path / "final.tar.gz"
    archive.write_bytes(httpx.get(url, headers={"X-API-Key": SDK_KEY}, timeout=60).content)
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "extracted", filter="data")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tok.name_or_path), tmp_path / "extracted")
    assert any("lora_" in n for n, _ in model.named_parameters())
    rest.delete_checkpoint_from_tinker_path(sampler_path).result()
    assert sampler_path not in [c.tinker_path for c in rest.list_checkpoints(tc.model_id).result().checkpoints]
    assert httpx.get(f"{server}/api/v1/files/not-a-token").status_code == 404


def test_unnamed_sampler_snapshots_are_pruned_and_the_newest_still_samples(service, trained):
    """Each save_weights_and_get_sampling_client is a snapshot; a run keeps its newest three."""
    tc, _ = trained
    samplers = [tc.save_weights_and_get_sampling_client().result() for _ in range(5)]
    rest = service.create_rest_client()
    paths = [c.tinker_path for c in rest.list_checkpoints(tc.model_id).result().checkpoints]
    assert len([p for p in paths if "/sampler_weights/ephemeral-" in p]) == 3
    out = samplers[-1].sample(types.ModelInput.from_ints(PROMPT), 1, types.SamplingParams(max_tokens=2)).result()
    assert len(out.sequences[0].tokens) == 2
    with pytest.raises(tinker.NotFoundError, match="does not exist"):  # the oldest snapshot is gone
        samplers[0].sample(types.ModelInput.from_ints(PROMPT), 1, types.SamplingParams(max_tokens=2)).result()


def test_bad_input_answers_clearly(server, service, trained, tok):
    rest = service.create_rest_client()
    with pytest.raises(tinker.NotFoundError):
        rest.get_training_run("no-such-model").result()
    headers = {"X-API-Key": SDK_KEY}
    r = httpx.post(f"{server}/api/v1/get_info", json={"model_id": "nope:train:0"}, headers=headers)
    assert r.status_code == 404 and "does not exist" in r.json()["error"]["message"]
    tc, _ = trained
    ids = tok.encode(TEXT)[:8]
    bad_shape = types.Datum(
        model_input=types.ModelInput.from_ints(ids[:-1]), loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0]}
    )
    with pytest.raises(tinker.UnprocessableEntityError, match="weights"):
        tc.forward_backward([bad_shape], "cross_entropy").result()
    with pytest.raises(tinker.UnprocessableEntityError, match="Unknown loss_fn 'hinge'"):
        tc.forward_backward([sft_datum(ids)], "hinge").result()  # type: ignore[arg-type]
    with pytest.raises(tinker.UnprocessableEntityError, match="has not published the stable_reinforce objective"):
        tc.forward_backward([rl_datum(ids, 0)], "stable_reinforce").result()
    with pytest.raises(tinker.UnprocessableEntityError, match="vocabulary"):
        tc.forward_backward([sft_datum([10**7, 1, 2])], "cross_entropy").result()
    with pytest.raises(tinker.UnprocessableEntityError, match="advantages"):
        tc.forward_backward([sft_datum(ids)], "ppo").result()
    r = httpx.post(f"{server}/api/v1/forward_backward", content=b"\xff\x00garbage", headers=headers)
    assert r.status_code == 422 and r.json()["error"]["type"] == "invalid_input"
    r = httpx.post(f"{server}/api/v1/no_such_route", json={}, headers=headers)
    assert r.status_code == 404 and "not offered" in r.json()["error"]["message"]
    r = httpx.post(f"{server}/api/v1/create_model", json={"base_model": TINY_NAME}, headers=headers)
    assert r.status_code == 422
    escape = {"session_id": "../../outside", "model_seq_id": 0, "base_model": TINY_NAME, "lora_config": {"rank": 2}}
    r = httpx.post(f"{server}/api/v1/create_model", json=escape, headers=headers)
    assert r.status_code == 422 and "session_id" in r.json()["error"]["message"]
    outside_base = {**escape, "session_id": "s", "base_model": "../x"}
    r = httpx.post(f"{server}/api/v1/create_model", json=outside_base, headers=headers)
    assert r.status_code in (403, 404)
    r = httpx.post(f"{server}/api/v1/retrieve_future", json={"request_id": "sample.nope"}, headers=headers)
    assert r.status_code == 404


@both_backends
def test_concurrent_model_creation_respects_max_runs(settings):
    """Eight create_model calls at once on a server allowing two runs: exactly two start, six get 429."""
    from concurrent.futures import ThreadPoolExecutor

    from fastapi.testclient import TestClient

    from main import create_app

    settings.runs.max_runs = 2
    with TestClient(create_app(settings)) as client:

        def create(i: int) -> int:
            body = {"session_id": "concurrent", "model_seq_id": i, "base_model": TINY_NAME, "lora_config": {"rank": 2}}
            return client.post("/api/v1/create_model", json=body).status_code

        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(create, range(8)))
        assert sorted(codes) == [200, 200] + [429] * 6, codes
        runs = client.get("/v1/runs").json()["items"]
        assert len(runs) == 2
        for run in runs:  # free the two workers at once
            assert client.delete(f"/v1/runs/{run['id']}").status_code == 200


def _example(name: str):
    """Import examples/<name>.py as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, PROJECT_ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # chz resolves its config classes through sys.modules
    spec.loader.exec_module(module)
    return module


def _cookbook_args(server: str, tiny_model_root, log_path) -> list[str]:
    """Options both cookbook examples take."""
    tokenizer = tiny_model_root / "base" / TINY_NAME
    return ["--base-url", server, "--api-key", SDK_KEY, "--model", TINY_NAME, "--tokenizer", str(tokenizer),
            "--log-path", str(log_path)]  # fmt: skip


def test_cookbook_supervised_loop_runs_on_local_chat_records(server, tiny_model_root, tmp_path):
    """examples/tinker_sl.py: the cookbook's renderer, dataset builder and supervised.train on test/data."""
    import json

    log = _example("tinker_sl").main([*_cookbook_args(server, tiny_model_root, tmp_path / "sl"), "--steps", "3"])
    rows = [json.loads(line) for line in (log / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train_mean_nll" in r] == [0, 1, 2]
    saved = [json.loads(line) for line in (log / "checkpoints.jsonl").read_text().splitlines()]
    state = saved[-1]["state_path"]
    runs = httpx.get(f"{server}/v1/runs", headers={"X-API-Key": KEY}).json()["items"]
    run = next(r for r in runs if state.startswith(f"tinker://{r['id']}/"))
    assert run["steps"] == 3


@pytest.mark.parametrize("loss", ["importance_sampling", "ppo"])
def test_cookbook_rl_loop_runs_with_a_numeric_verifier(loss, server, tiny_model_root, tmp_path):
    """examples/tinker_rl.py: generated arithmetic problems, the cookbook's ProblemEnv and rl.train loop."""
    args = [*_cookbook_args(server, tiny_model_root, tmp_path / loss), "--loss", loss, "--steps", "2",
            "--batch-size", "2", "--group-size", "2", "--n-test", "4", "--max-tokens", "6"]  # fmt: skip
    curve = _example("tinker_rl").main(args)
    assert [step for step, _ in curve] == [0, 1, 2]
    assert all(0.0 <= acc <= 1.0 for _, acc in curve)


def test_queued_samples_share_engine_calls_keep_order_and_queued_jobs_cancel(settings, tok):
    """Sampling jobs queued back to back run in one engine call; never past an optim_step; cancel takes queued jobs."""
    from concurrent.futures import ThreadPoolExecutor

    from fastapi.testclient import TestClient

    from main import create_app

    text = tok.decode(PROMPT)
    seq = PROMPT + TARGET
    example = {"input_ids": seq[:-1], "target_ids": seq[1:]}
    greedy = {"prompts": [text], "max_tokens": 4, "temperature": 0}
    with TestClient(create_app(settings)) as client:
        run_id = client.post("/v1/runs", json={"lora": {"r": 8, "alpha": 16}, "seed": 1}).json()["id"]

        def queue(primitive: str, body: dict) -> str:
            r = client.post(f"/v1/runs/{run_id}/{primitive}", json=body)
            assert r.status_code == 202, r.text
            return r.json()["job_id"]

        # Everything below is queued while the worker is still loading the model, so the queue order is known.
        before = queue("sample", greedy)
        queue("forward_backward", {"examples": [example]})
        queue("optim_step", {"learning_rate": 5e-2})
        after = queue("sample", greedy)
        dropped_sample = queue("sample", greedy)
        dropped_grads = queue("forward_backward", {"examples": [example]})
        for job_id, kind in ((dropped_sample, "sample"), (dropped_grads, "forward_backward")):
            r = client.post("/api/v1/cancel_future", json={"request_id": f"{kind}.{job_id}.0"})
            assert r.status_code == 200, r.text
        with ThreadPoolExecutor(8) as pool:
            body = {"prompts": [text], "num_samples": 2, "max_tokens": 4, "temperature": 1.0}
            bodies = [{**body, "seed": i} for i in range(8)]
            concurrent = list(pool.map(lambda b: queue("sample", b), bodies))

        def done(job_id: str) -> dict:
            job = client.get(f"/v1/jobs/{job_id}", params={"wait": True, "timeout": 120}).json()
            assert job["status"] == "completed", job
            return job["result"]

        first, second = done(before), done(after)
        results = [done(j) for j in concurrent]
        # Order: the sample queued after optim_step saw the new weights, and was not batched with the one before it.
        assert (first["step"], second["step"]) == (0, 1)
        assert first["batch"]["engine_call"] != second["batch"]["engine_call"]
        a, b = first["results"][0]["samples"][0], second["results"][0]["samples"][0]
        assert (a["tokens"], a["logprobs"]) != (b["tokens"], b["logprobs"])
        # Batching: eight jobs (sixteen rows), each its own correct answer, in fewer engine calls than jobs.
        for r in results:
            samples = r["results"][0]["samples"]
            assert len(samples) == 2 and all(1 <= len(s["tokens"]) <= 4 for s in samples)
            assert all(len(s["logprobs"]) == len(s["tokens"]) for s in samples)
        calls = {r["batch"]["engine_call"] for r in results}
        assert len(calls) < len(concurrent), [r["batch"] for r in results]
        assert max(r["batch"]["jobs"] for r in results) > 1
        # Cancelled jobs never ran and answer as the SDK expects a failed future; their gradients were taken back.
        for job_id, kind in ((dropped_sample, "sample"), (dropped_grads, "forward_backward")):
            job = client.get(f"/v1/jobs/{job_id}").json()
            assert job["status"] == "failed" and job["started_at"] is None and "cancelled" in job["error"]
            r = client.post("/api/v1/retrieve_future", json={"request_id": f"{kind}.{job_id}.0"})
            assert r.json()["category"] == "user" and "cancelled" in r.json()["error"]
        r = client.post(f"/v1/runs/{run_id}/optim_step", json={"learning_rate": 1e-2})
        assert r.status_code == 409 and "no gradients" in r.json()["error"]["message"]
        # A finished job cannot be cancelled; an unknown one is 404.
        r = client.post("/api/v1/cancel_future", json={"request_id": f"sample.{after}.0"})
        assert r.status_code == 409 and "only a queued job" in r.json()["error"]["message"]
        assert client.post("/api/v1/cancel_future", json={"request_id": "sample.nope.0"}).status_code == 404
        assert client.delete(f"/v1/runs/{run_id}").status_code == 200


def test_concurrent_sdk_samples_on_two_snapshots_each_use_their_weights(server, service, trained):
    """Eight SDK samples in flight at once, half on the trained snapshot and half on the bare base: each is answered
    from its own weights (the worker batches them, one engine call per snapshot)."""
    tc, _ = trained
    trained_sampler = tc.save_weights_and_get_sampling_client().result()
    base_sampler = service.create_sampling_client(base_model=TINY_NAME).result()
    greedy = types.SamplingParams(max_tokens=3, temperature=0.0)
    prompt = types.ModelInput.from_ints(PROMPT)
    futures = [(s, s.sample(prompt, 1, greedy)) for _ in range(4) for s in (trained_sampler, base_sampler)]
    answers = [(s is trained_sampler, f.result().sequences[0].tokens) for s, f in futures]
    assert all(tokens == TARGET[:3] for on_trained, tokens in answers if on_trained)
    base_answers = [tokens for on_trained, tokens in answers if not on_trained]
    assert len({tuple(t) for t in base_answers}) == 1 and base_answers[0] != TARGET[:3]
    # retrieve_futures (the SDK's session poller, switched on by client/config): the session's four completions,
    # then nothing new past the returned cursor; an unknown session is 404.
    url, headers = f"{server}/api/v1/retrieve_futures", {"X-API-Key": SDK_KEY}
    target = {"sampling_session_id": trained_sampler._sampling_session_id}
    target["cloned_sampler_id"] = trained_sampler._cloned_sampler_id
    first = httpx.post(url, json={"target": target, "prev_cursor": 0, "timeout": 0}, headers=headers).json()
    assert len(first["completions"]) == 4 and {c["state"] for c in first["completions"]} == {"finished"}
    again = httpx.post(url, json={"target": target, "prev_cursor": first["cursor"], "timeout": 0}, headers=headers)
    assert again.json() == {"completions": [], "cursor": first["cursor"]}
    bad = {"target": {"sampling_session_id": "nope"}, "prev_cursor": 0, "timeout": 0}
    assert httpx.post(url, json=bad, headers=headers).status_code == 404


@both_backends
def test_claiming_a_sampling_batch_is_bounded_ordered_and_cancel_is_atomic(settings):
    """claim_batch takes at most `limit` sampling jobs and never a job past another kind; of eight concurrent
    cancels of one queued job exactly one wins, and a claimed (running) job cannot be cancelled."""
    from concurrent.futures import ThreadPoolExecutor

    from entity.runs import RunRow, RunStatus
    from entity.task import utcnow
    from service.runs import RunStore
    from service.tasks import TaskStore
    from util.errors import ConflictError

    store = RunStore(TaskStore(settings.database_url).engine)
    now = utcnow()
    row = RunRow(id="claims", status=RunStatus.ready, base_model=TINY_NAME, base_path="x", lora={"r": 2}, seed=0,
                 vocab_size=10, created_at=now, last_used_at=now)  # fmt: skip
    store.add_run(row)
    kinds = ["sample_tokens"] * 5 + ["loss_step", "sample", "sample_tokens", "optim_step"]
    jobs = [store.add_job("claims", kind, {"forward_only": False}, grads=kind == "loss_step") for kind in kinds]
    batchable = frozenset({"sample", "sample_tokens"})
    claims = [[j.kind for j in store.claim_batch("claims", batchable, 3)] for _ in range(5)]
    assert claims == [["sample_tokens"] * 3, ["sample_tokens"] * 2, ["loss_step"], ["sample", "sample_tokens"],
                      ["optim_step"]]  # fmt: skip
    assert store.claim_batch("claims", batchable, 3) == []
    target = store.add_job("claims", "loss_step", {"forward_only": False}, grads=True)

    def cancel(_: int) -> str:
        try:
            store.cancel_job(target.id, "cancelled: test")
            return "ok"
        except ConflictError:
            return "conflict"

    with ThreadPoolExecutor(8) as pool:
        outcomes = sorted(pool.map(cancel, range(8)))
    assert outcomes == ["conflict"] * 7 + ["ok"]
    assert store.get_job(target.id).error == "cancelled: test"
    assert store.get_run("claims").pending_grads == 1  # two loss_steps queued, the cancelled one taken back
    with pytest.raises(ConflictError, match="only a queued job"):
        store.cancel_job(jobs[0].id, "too late")
