"""The main job end to end: ``diffgr2 pipeline --preset smoke`` on the real Amazon Beauty data (a tiny slice)."""

import json
import os
import time
import warnings

import pytest

from diffgr2_trl.cli import main
from diffgr2_trl.pipeline import PIPELINE_STAGES, load_preset


def _data_dir():
    from diffgr2_trl.rerank.data import locate_data_dir

    try:
        return locate_data_dir()
    except FileNotFoundError:
        return None


def test_presets_load_and_overrides_are_checked(tmp_path):
    for name in ("smoke", "cpu", "gpu-small", "gpu"):
        preset = load_preset(name)
        assert {"prepare", "ar_sft", "cft", "opd", "rl", "evaluate", "decode"} <= set(preset)
    bad = tmp_path / "o.yaml"
    bad.write_text("cftt: {max_steps: 1}\n")
    with pytest.raises(ValueError, match="unknown section .cftt."):
        load_preset("smoke", str(bad))
    with pytest.raises(ValueError, match="Unknown pipeline preset 'huge'"):
        load_preset("huge")


@pytest.mark.slow
@pytest.mark.skipif(_data_dir() is None, reason="Amazon Beauty data not found (../shared/data/amazon-beauty)")
def test_smoke_pipeline_runs_every_stage_resumes_and_reports(tmp_path):
    out = tmp_path / "run"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", FutureWarning)
        assert main(["pipeline", "--preset", "smoke", "--output_dir", str(out)]) == 0
    # the pipeline passes every stage the current option names: no deprecated spelling anywhere
    assert not [str(w.message) for w in seen if str(w.message).startswith("diffgr2 ")]
    for name, _ in PIPELINE_STAGES:
        record = json.loads((out / name / "stage.json").read_text())
        assert record["status"] == "done" and record["wall_s"] >= 0
    report = json.loads((out / "report.json").read_text())
    assert {"stages", "decode", "config", "data", "wall_s"} <= set(report)
    assert {"eval_ar", "eval_naive", "eval_cft", "eval_opd", "eval_rl"} <= set(report["stages"])
    assert all("R@1" in report["stages"][s]["metrics"] for s in ("eval_ar", "eval_rl"))
    # every decoder runs unconstrained (the paper's rows) and constrained, side by side
    assert report["decode"][0]["method"] == "ar" and len(report["decode"]) == 2 * (1 + len(report["config"]["decode"]["taus"]))
    assert all(r["time_vs_unconstrained"] > 0 for r in report["decode"] if r["constrained"])
    # constrained decoding gives a valid ranking for every row of every model, trained or not, AR and block diffusion
    for stage in ("eval_ar", "eval_naive", "eval_cft", "eval_opd", "eval_rl"):
        assert report["stages"][stage]["constrained"]["metrics"]["valid_rate"] == 1.0, stage
    assert all(r["valid_rate"] == 1.0 for r in report["decode"] if r["constrained"])
    md = (out / "report.md").read_text()
    for row in ("pre-rank order (floor)", "logistic re-ranker", "AR GR2", "naive conversion", "+ CFT", "+ CFT + OPD",
                "+ OPD -> RL", "+ OPD -> RL, constrained", "ΔR@1 vs floor", "plumbing check only", "Glossary"):
        assert row in md
    # every evaluated row has its paired bootstrap CI to the floor (and, but for the teacher, to the teacher)
    cis = report["confidence_intervals"]
    assert {"baseline", "eval_ar", "eval_rl"} <= set(cis) and "vs_teacher" in cis["eval_rl"]
    assert all(c["vs_floor"]["lo"] <= c["vs_floor"]["diff"] <= c["vs_floor"]["hi"] for c in cis.values())
    mid = load_preset("smoke")["ar_mid"]
    assert report["stages"]["ar_mid"]["lists"] == mid["mid_max_steps"] * mid["mid_batch_size"]  # fresh lists
    assert 0 <= report["stages"]["ar_mid"]["heldout"]["exact"] <= 1
    assert "```json" not in md  # raw JSON only in report.json
    assert (out / "accuracy_vs_speed.png").exists() and (out / "curve_cft.png").exists()

    # each stage's args.yaml re-runs it alone, model and data paths inside: the evaluation reproduces its numbers
    again = tmp_path / "again.json"
    assert main(["evaluate", "--config", str(out / "eval_ar" / "args.yaml"), "--json", str(again),
                 "--outputs", str(tmp_path / "again_outputs.json")]) == 0
    assert json.loads(again.read_text())["metrics"]["R@1"] == report["stages"]["eval_ar"]["metrics"]["R@1"]
    assert main(["cft", "--config", str(out / "cft" / "args.yaml"), "--output_dir", str(tmp_path / "cft2"),
                 "--max_steps", "2", "--save_strategy", "no"]) == 0
    assert (tmp_path / "cft2" / "config.json").is_file()

    # re-running skips every finished stage and keeps their outputs
    before = {n: (out / n / "stage.json").stat().st_mtime for n, _ in PIPELINE_STAGES if n != "report"}
    t0 = time.time()
    assert main(["pipeline", "--preset", "smoke", "--output_dir", str(out)]) == 0
    assert time.time() - t0 < 60
    assert before == {n: (out / n / "stage.json").stat().st_mtime for n in before}

    # an interrupted training stage (no marker, checkpoints left) resumes from its last checkpoint: drop the last
    # checkpoint and tag the previous one's state; the tag surviving into the final log history proves the resume
    import shutil

    os.remove(out / "cft" / "stage.json")
    ckpts = sorted((out / "cft" / "model").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert len(ckpts) >= 2
    shutil.rmtree(ckpts[-1])
    state_path = ckpts[-2] / "trainer_state.json"
    state = json.loads(state_path.read_text())
    state["log_history"].append({"step": state["global_step"], "resume_probe": 1.0})
    state_path.write_text(json.dumps(state))
    assert main(["pipeline", "--preset", "smoke", "--output_dir", str(out), "--stages", "cft"]) == 0
    history = json.loads((out / "cft" / "model" / "log_history.json").read_text())
    assert any(h.get("resume_probe") == 1.0 for h in history)
    assert max(h["step"] for h in history) == load_preset("smoke")["cft"]["max_steps"]
    assert (out / "cft" / "stage.json").exists()


def test_overrides_are_validated_key_by_key_before_anything_runs(tmp_path):
    from diffgr2_trl.errors import UserError

    typo = tmp_path / "typo.yaml"
    typo.write_text("cft: {learning_rat: 0.1}\nopd: {max_new_tokens: 8, tua: 0.5}\n")
    with pytest.raises(UserError, match=r"cft.learning_rat is not an option; did you mean 'learning_rate'") as e:
        load_preset("cpu", str(typo))
    assert "opd.tua" in str(e.value) and "'tau'" in str(e.value)  # every problem at once
    with pytest.raises(UserError, match="unknown section 'cftt'.*did you mean 'cft'"):
        (tmp_path / "s.yaml").write_text("cftt: {max_steps: 1}\n")
        load_preset("smoke", str(tmp_path / "s.yaml"))
    ok = tmp_path / "ok.yaml"
    ok.write_text("cft: {learning_rate: 0.1}\ndecode: {taus: [0.9]}\ntargets: {teacher_valid: 0.5}\n")
    preset = load_preset("smoke", str(ok))
    assert preset["cft"]["learning_rate"] == 0.1 and preset["cft"]["max_steps"] == 20  # merged, not replaced


def test_changed_inputs_are_never_reused_silently(tmp_path, monkeypatch):
    """A stage recorded with other inputs stops the run, naming the change; --overwrite removes it (and only it)."""
    from diffgr2_trl.errors import UserError
    from diffgr2_trl.pipeline import runner

    monkeypatch.setattr(runner, "data_digest", lambda data_dir: {"dataset": "Toy", "files": []})
    args = runner.PipelineArguments(preset="smoke", output_dir=str(tmp_path / "run"))
    ctx = runner.Context(args, load_preset("smoke"))
    inputs = runner.stage_inputs(ctx)
    # upstream changes propagate: every stage below cft has a new fingerprint when cft's options change
    changed = runner.Context(args, {**load_preset("smoke"), "cft": {**load_preset("smoke")["cft"], "learning_rate": 0.1}})
    new = runner.stage_inputs(changed)
    fp = runner.fingerprint
    assert fp(new["convert"]) == fp(inputs["convert"]) and fp(new["cft"]) != fp(inputs["cft"])
    assert fp(new["rl"]) != fp(inputs["rl"]) and fp(new["eval_rl"]) != fp(inputs["eval_rl"])

    for name in ("convert", "cft"):
        d = ctx.run / name
        d.mkdir(parents=True)
        (d / "stage.json").write_text(json.dumps({"fingerprint": fp(inputs[name]), "inputs": inputs[name]}))
    assert runner.check_stage_inputs(ctx, ["convert", "cft"], inputs) == []
    with pytest.raises(UserError, match=r"(?s)cft: options.cft.learning_rate: 0.003 -> 0.1.*--overwrite"):
        runner.check_stage_inputs(changed, ["convert", "cft"], new)
    # an interrupted stage (inputs.json, no stage.json) is checked too: its checkpoints came from those inputs
    (ctx.run / "cft" / "stage.json").rename(ctx.run / "cft" / "inputs.json")
    with pytest.raises(UserError, match="learning_rate"):
        runner.check_stage_inputs(changed, ["cft"], new)
    changed.args.overwrite = True
    assert runner.check_stage_inputs(changed, ["convert", "cft"], new) == ["cft"]
