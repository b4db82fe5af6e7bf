"""Reports: every figure in report.md and in the plots is the one in the run files; plots carry
axis labels, a title and a legend; a real (2-step) training run goes through train -> eval -> report."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from pissa.cli import app
from pissa.errors import PissaError
from pissa.eval.scoring import EvalResult, write_results
from pissa.plots import spectra_figure
from pissa.report.runs import load_run, load_runs, metric_figure, write_run_report

runner = CliRunner()


def fake_run(folder, method: str, decay: float, steps: int = 30, correct=(True, False, True)):
    """A run folder as `pissa train` + `pissa eval` write it, with a smooth, noisy loss curve."""
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(len(method))
    log = []
    for step in range(1, steps + 1):
        loss = 0.6 + 1.8 * math.exp(-step / decay) + 0.02 * torch.rand(1, generator=gen).item()
        log.append({"step": step, "loss": loss, "grad_norm": 2.0 / step ** 0.5, "lr": 2e-5, "tokens": 512 * step,
                    "tokens_per_s": 250.0 + step, "step_s": 2.0, "epoch": step / steps})
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    summary = {"method": method, "steps": steps, "first_loss": log[0]["loss"], "final_loss": log[-1]["loss"],
               "trainable_params": 4_884_480, "train_seconds": 61.5, "tokens_per_s_median": 265.0}
    (folder / "summary.json").write_text(json.dumps(summary))
    records = [{"index": i, "prompt": f"q{i}", "output": f"The answer is: {i}", "extracted": str(i),
                "gold": str(i if ok else -1), "correct": ok} for i, ok in enumerate(correct)]
    result = EvalResult(accuracy=sum(correct) / len(correct), correct=sum(correct), total=len(correct),
                        perplexity=1.234, records=records, seconds=1.0, backend="transformers")
    write_results(folder / "eval" / "arith-gsm8k", result, {"data": "arith", "config": {"task": "gsm8k"}})
    return log


def test_report_from_fabricated_runs(tmp_path):
    logs = {"lora": fake_run(tmp_path / "lora", "lora", decay=20.0, correct=(False, False, True)),
            "pissa": fake_run(tmp_path / "pissa", "pissa", decay=5.0, correct=(True, True, False))}
    path = write_run_report(load_runs([tmp_path / "lora", tmp_path / "pissa"]), tmp_path / "report",
                            title="LoRA vs PiSSA")
    md = path.read_text()
    assert md.startswith("# LoRA vs PiSSA")
    for name, log in logs.items():
        lowest = min(r["loss"] for r in log)
        row = next(line for line in md.splitlines() if line.startswith(f"| {name} | {name} |"))
        assert f"| {log[0]['loss']:.4f} | {log[-1]['loss']:.4f} | {lowest:.4f} |" in row
        assert "4,884,480" in row
    assert "| lora | `arith` | gsm8k | 33.3% | 1/3 | 1.234 |" in md
    assert "| pissa | `arith` | gsm8k | 66.7% | 2/3 | 1.234 |" in md
    for png in ("loss.png", "grad_norm.png", "accuracy.png"):
        assert f"]({png})" in md
        assert (path.parent / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The per-example outputs travel with the report, unchanged.
    copied = path.parent / "predictions" / "pissa-arith-gsm8k.jsonl"
    assert copied.read_text() == (tmp_path / "pissa" / "eval" / "arith-gsm8k" / "predictions.jsonl").read_text()
    assert "(predictions/pissa-arith-gsm8k.jsonl)" in md


def test_loss_plot_draws_the_logged_values_with_labels(tmp_path):
    log = fake_run(tmp_path / "pissa", "pissa", decay=5.0)
    fig = metric_figure([load_run(tmp_path / "pissa")], "loss", "Training loss", "cross-entropy loss")
    ax = fig.axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("optimizer step", "cross-entropy loss",
                                                                  "Training loss")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["pissa"]
    (line,) = ax.get_lines()
    assert list(line.get_xdata()) == [r["step"] for r in log]
    assert list(line.get_ydata()) == [r["loss"] for r in log]


def test_spectrum_helpers_agree_with_torch_svd():
    W = torch.randn(48, 32, generator=torch.Generator().manual_seed(0))
    s = torch.linalg.svdvals(W)
    torch.testing.assert_close(s, torch.linalg.svd(W, full_matrices=False).S)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    residual = W - (U[:, :4] * S[:4]) @ Vh[:4]  # (48, 32): PiSSA's residual at r = 4
    fig = spectra_figure({"layer.q_proj": {"W": s, "W_res": torch.linalg.svdvals(residual)}}, rank=4)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "singular value index" and ax.get_ylabel() == "singular value"
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"W", "W_res", "rank r = 4"}
    # The residual's spectrum is W's with the top r values removed.
    torch.testing.assert_close(torch.tensor(lines["W_res"].get_ydata()[: 32 - 4]), s[4:], atol=1e-4, rtol=1e-4)


def test_load_run_refusals(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PissaError, match="holds no training log"):
        load_run(tmp_path / "empty")
    with pytest.raises(PissaError, match="does not exist"):
        load_run(tmp_path / "nope")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "log.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n')
    with pytest.raises(PissaError, match="line 2 is not valid JSON"):
        load_run(tmp_path / "bad")


def test_same_named_runs_get_distinct_names(tmp_path):
    fake_run(tmp_path / "a" / "run", "lora", decay=9.0)
    fake_run(tmp_path / "b" / "run", "pissa", decay=4.0)
    assert [r.name for r in load_runs([tmp_path / "a" / "run", tmp_path / "b" / "run"])] == ["a/run", "b/run"]


def test_report_cli_refuses_bad_input_and_existing_out(tmp_path):
    fake_run(tmp_path / "pissa", "pissa", decay=5.0)
    out = tmp_path / "report"
    result = runner.invoke(app, ["report", str(tmp_path / "missing"), "--out", str(out)])
    assert result.exit_code == 2 and "does not exist" in " ".join(result.output.split()) and not out.exists()
    assert runner.invoke(app, ["report", str(tmp_path / "pissa"), "--out", str(out)]).exit_code == 0
    again = runner.invoke(app, ["report", str(tmp_path / "pissa"), "--out", str(out)])
    assert again.exit_code == 2 and "--overwrite" in " ".join(again.output.split())


def test_real_two_step_run_train_eval_report(tmp_path, make_tiny_llama, smollm2_tokenizer):
    """`pissa train` (2 steps) -> `pissa eval RUN` -> `pissa report RUN`: the report holds the run's numbers."""
    model_dir, run, out = tmp_path / "tiny", tmp_path / "run", tmp_path / "report"
    make_tiny_llama(vocab_size=len(smollm2_tokenizer)).save_pretrained(model_dir)
    smollm2_tokenizer.save_pretrained(model_dir)
    trained = runner.invoke(app, ["train", "--model", str(model_dir), "--method", "pissa", "--rank", "4",
                                  "--max-steps", "2", "--limit", "8", "--lr", "1e-3", "--out", str(run),
                                  "--no-tensorboard"])
    assert trained.exit_code == 0, trained.output
    evaluated = runner.invoke(app, ["eval", str(run), "--limit", "2", "--max-new-tokens", "4"])
    assert evaluated.exit_code == 0, evaluated.output
    evaluation = json.loads((run / "eval" / "arith-gsm8k" / "eval.json").read_text())
    assert evaluation["model"] == str(run / "residual") and evaluation["adapter"] == str(run / "adapter")
    reported = runner.invoke(app, ["report", str(run), "--out", str(out)])
    assert reported.exit_code == 0, reported.output
    md = (out / "report.md").read_text()
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    assert f"| run | pissa | 2 | {log[0]['loss']:.4f} | {log[1]['loss']:.4f} |" in md
    accuracy = f"{100 * evaluation['accuracy']:.1f}% | {evaluation['correct']}/2 | {evaluation['perplexity']:.4g}"
    assert accuracy in md
    assert (out / "loss.png").exists() and (out / "predictions" / "run-arith-gsm8k.jsonl").exists()


def test_pissa_demo_tiny_end_to_end(tmp_path):
    """`pissa demo --tiny --steps 2`: every report file exists and holds the numbers the run computed."""
    out = tmp_path / "demo-report"
    result = runner.invoke(app, ["demo", "--tiny", "--steps", "2", "--test-examples", "3", "--max-new-tokens", "6",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    for name in ("report.md", "loss.png", "grad_norm.png", "accuracy.png", "spectrum.png", "demo.json"):
        assert (out / name).exists(), name
    assert not (tmp_path / ".demo-report.work").exists()  # the scratch folder is gone
    numbers = json.loads((out / "demo.json").read_text())
    md = (out / "report.md").read_text()
    for name in ("base", "lora", "pissa"):
        e = numbers["eval"][name]
        predictions = [json.loads(line) for line in
                       (out / "predictions" / f"{name}-arith-test-gsm8k.jsonl").read_text().splitlines()]
        assert len(predictions) == e["total"] == 3
        assert e["correct"] == sum(p["correct"] for p in predictions)
        assert f"| {name} | `arith:test` | gsm8k | {100 * e['accuracy']:.1f}% | {e['correct']}/3 |" in md
    for method in ("lora", "pissa"):
        t = numbers["train"][method]
        assert t["steps"] == 2
        assert f"| {method} | {method} | 2 | {t['first_loss']:.4f} | {t['final_loss']:.4f} |" in md
    # Both start from the same function: PiSSA's init leaves the model unchanged, LoRA's B = 0.
    assert numbers["train"]["lora"]["first_loss"] == pytest.approx(numbers["train"]["pissa"]["first_loss"], rel=1e-5)
    assert numbers["init"]["max_recon_abs_err"] < 1e-5
    conv = numbers["convert"]
    assert conv["max_abs_logit_diff"] < 1e-4 and conv["rank_out"] == 16
    assert f"= {conv['max_abs_logit_diff']:.3g}" in md
    assert "pissa demo --steps 2" in md and "Quantization error" in md
