"""The main job end to end: ``diffgr2 pipeline --preset smoke`` on a generated dataset in the Amazon file format.

The real Beauty data is read by the data tests (``tests/rerank/test_data.py``, ``test_ar_cli.py``); the plumbing of
all 16 stages does not need its 22k users, whose ``prepare`` was most of this test's time.
"""

import json
import os
import time
import warnings

import pytest

from diffgr2_trl.cli import main
from diffgr2_trl.pipeline import PIPELINE_STAGES, load_preset
from diffgr2_trl.pipeline.report import TABLE_ROWS
from tests.helpers import write_toy_amazon


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
def test_smoke_pipeline_runs_every_stage_resumes_and_reports(tmp_path):
    out = tmp_path / "run"
    # "Toys": the dataset name is inferred from the directory's files, as it must be for any Amazon dataset
    data = write_toy_amazon(tmp_path / "toys", n_users=400, n_items=120, name="Toys")
    overrides = tmp_path / "overrides.yaml"
    # 120 items: 8 codes per level keep every level in use; evaluations decode in two processes (one batch each
    # here, so no child starts: tests/rerank/test_workers.py runs children); the naive conversion decodes only the
    # first 4 of the 8 evaluation rows
    overrides.write_text("prepare: {codebook_size: 8}\nevaluate: {workers: 2, naive_limit: 4}\n")
    common = ["--preset", "smoke", "--output_dir", str(out), "--data_dir", str(data), "--overrides", str(overrides)]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", FutureWarning)
        assert main(["pipeline", *common]) == 0
    # the AR teacher's constrained pass kept its valid unconstrained rows and decoded the others; block students
    # decode both passes in full
    free = json.loads((out / "eval_ar" / "eval_outputs.json").read_text())
    kept = json.loads((out / "eval_ar" / "constrained_outputs.json").read_text())
    assert json.loads((out / "eval_ar" / "constrained.json").read_text())["reused_valid_rows"] == sum(
        r["valid"] for r in free)
    assert all(k["completion"] == f["completion"] for f, k in zip(free, kept) if f["valid"])
    assert all(k["valid"] for k in kept)
    assert json.loads((out / "eval_cft" / "constrained.json").read_text())["reused_valid_rows"] == 0
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
    # ... at every batch size of the decode section, each speedup against AR at its own batch size
    sizes, taus = report["config"]["decode"]["batch_sizes"], report["config"]["decode"]["taus"]
    assert len(sizes) > 1 and len(report["decode"]) == 2 * (1 + len(taus)) * len(sizes)
    assert [r["batch_size"] for r in report["decode"]] == [b for b in sizes for _ in range(2 * (1 + len(taus)))]
    for b in sizes:
        at_b = [r for r in report["decode"] if r["batch_size"] == b]
        assert at_b[0]["method"] == "ar" and at_b[0]["speedup_vs_ar"] == 1.0
        assert all(abs(r["speedup_vs_ar"] - r["tokens_per_s"] / at_b[0]["tokens_per_s"]) < 1e-9 for r in at_b)
    assert all(r["time_vs_unconstrained"] > 0 for r in report["decode"] if r["constrained"])
    # constrained decoding gives a valid ranking for every row of every model, trained or not, AR and block diffusion
    for stage in ("eval_ar", "eval_naive", "eval_cft", "eval_opd", "eval_rl"):
        assert report["stages"][stage]["constrained"]["metrics"]["valid_rate"] == 1.0, stage
    assert all(r["valid_rate"] == 1.0 for r in report["decode"] if r["constrained"])
    md = (out / "report.md").read_text()
    for row in ("pre-rank order (floor)", "logistic re-ranker", "AR GR2", "naive conversion", "+ CFT", "+ CFT + OPD",
                "+ OPD -> RL", "+ OPD -> RL, constrained", "ΔR@1 vs floor", "plumbing check only", "Glossary",
                "evidence ranker (what the traces teach)", "ΔR@3 vs floor", "copy rate", "top-1 agreement"):
        assert row in md
    # every evaluated row has its paired bootstrap CI to the floor (and, but for the teacher, to the teacher)
    cis = report["confidence_intervals"]
    assert {"baseline", "reference", "eval_ar", "eval_rl"} <= set(cis) and "vs_teacher" in cis["eval_rl"]
    # copy rate and agreement with the AR teacher: constrained rows are always valid, so both are measured there
    constrained = cis["eval_rl:constrained"]
    assert 0 <= constrained["copy_rate"] <= 1 and constrained["agreement"]["n"] == report["stages"]["eval_rl"]["n"]
    assert 0 <= constrained["agreement"]["top1"] <= 1 and -1 <= constrained["agreement"]["kendall_tau"] <= 1
    # the reference row is the evidence ranker the traces follow, on the same rows, fitted on the train split
    reference = json.loads((out / "reference" / "eval.json").read_text())
    assert reference["n"] == report["stages"]["eval_rl"]["n"] and reference["levels"] == 3
    rows = {stage for _, stage in TABLE_ROWS}
    assert all(c["vs_floor"]["lo"] <= c["vs_floor"]["diff"] <= c["vs_floor"]["hi"] for k, c in cis.items()
               if k.partition(":")[0] in rows)
    # the teacher before RL: unconstrained only, on the same rows, compared with the teacher after RL
    assert report["stages"]["eval_sft"]["constrained"] is False and report["stages"]["eval_sft"]["n"] == 8
    assert set(cis["teacher_rl_vs_sft"]) == {"R@1", "R@3"} and cis["teacher_rl_vs_sft"]["R@1"]["n"] == 8
    assert "## The AR teacher before and after GR2's RL" in md and "AR GR2 before RL (SFT)" in md
    # naive_limit caps the naive conversion's rows (both passes), and the report says so in its label
    naive = report["stages"]["eval_naive"]
    assert naive["n"] == 4 and naive["constrained"]["n"] == 4 and "naive conversion (first 4 rows)" in md
    assert report["stages"]["eval_cft"]["n"] == 8
    mid = load_preset("smoke")["ar_mid"]
    assert report["stages"]["ar_mid"]["lists"] == mid["mid_max_steps"] * mid["mid_batch_size"]  # fresh lists
    assert 0 <= report["stages"]["ar_mid"]["heldout"]["exact"] <= 1
    assert "```json" not in md  # raw JSON only in report.json
    assert "| dataset | Toys (400 users, 120 items" in md and report["dataset"] == "Toys"
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
    assert main(["pipeline", *common]) == 0
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
    assert main(["pipeline", *common, "--stages", "cft"]) == 0
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


def test_override_values_are_parsed_before_anything_runs(tmp_path):
    """A wrong type fails up front, naming the file, section, key, value and expected type, one line per problem
    (it used to pass the key check and stop the run at the cft stage, minutes in)."""
    from diffgr2_trl.errors import UserError

    bad = tmp_path / "bad.yaml"
    bad.write_text("cft: {learning_rate: fast, max_steps: 2.5, bf16: maybe}\nevaluate: {split: tst}\n"
                   "decode: {taus: [0.9, x], batch_sizes: [1, 0]}\ntargets: {speedup: quick}\n")
    with pytest.raises(UserError) as e:
        load_preset("smoke", str(bad))
    lines = str(e.value).splitlines()
    assert lines[0] == f"{bad}: 7 problems:"
    assert f"  {bad}: cft.learning_rate = 'fast': expected a number." in lines
    assert f"  {bad}: cft.max_steps = 2.5: expected an integer." in lines
    assert f"  {bad}: cft.bf16 = 'maybe': expected a boolean (true or false)." in lines
    assert f"  {bad}: evaluate.split = 'tst': expected one of train, valid, test." in lines
    assert any(line.startswith(f"  {bad}: decode.taus = [0.9, 'x']") for line in lines)
    assert any(line.startswith(f"  {bad}: decode.batch_sizes = [1, 0]: expected a list of positive integers")
               for line in lines)
    assert any(line.startswith(f"  {bad}: targets.speedup = 'quick'") for line in lines)
    # YAML reads 1e-3 as a string: the option's own parser accepts it, as the stage will
    (tmp_path / "ok.yaml").write_text("cft: {learning_rate: 1e-3, max_steps: 3, bf16: false}\n")
    assert load_preset("smoke", str(tmp_path / "ok.yaml"))["cft"]["learning_rate"] == "1e-3"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("block_size: eight\n")
    with pytest.raises(UserError, match=r"--config .*c.yaml: block_size = 'eight': expected an integer"):
        main(["convert", "--config", str(cfg)])


def test_report_names_its_dataset_model_preset_and_rows(tmp_path):
    """A run on another Amazon dataset says so, and each figure says which rows it is computed on."""
    from diffgr2_trl.pipeline.report import write_report

    prepare = {"rows": {"train": 160, "valid": 40, "test": 1500},
               "stats": {"users": 1600, "items": 900, "interactions": 12000},
               "floor": {"train": {"R@1": 0.3, "R@3": 0.6, "n": 5000}, "test": {"R@1": 0.31, "R@3": 0.61, "n": 1500}},
               "inputs": {"data": {"dataset": "Toys_and_Games", "files": []}}}
    metrics = {"R@1": 0.32, "R@3": 0.62, "R@5": 0.8, "N@3": 0.5, "N@5": 0.55, "valid_rate": 1.0, "errors": {}}
    for name, m in (("prepare", prepare), ("eval_ar", {"n": 200, "metrics": metrics, "prerank": metrics})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "stage.json").write_text(json.dumps({"stage": name, "wall_s": 1.0, "metrics": m}))
    config = {"ar_sft": {"shape": "mini"}, "targets": {}}
    write_report(tmp_path, "cpu", config)
    md = (tmp_path / "report.md").read_text()
    assert md.splitlines()[0].startswith("# Diffusion-GR2 pipeline report: Toys_and_Games, preset `cpu`")
    assert "Beauty" not in md
    assert "| dataset | Toys_and_Games (1,600 users, 900 items, 12,000 interactions) |" in md
    assert "| AR teacher model | qwen3 `mini`, built from a config (no pretrained weights) |" in md
    assert "| accuracy table rows | 200 test rows of 1,500 |" in md
    assert "| train | 160 | 0.3000 | 0.6000 | 5000 |" in md  # the floor's own row count beside the prepared rows
    assert json.loads((tmp_path / "report.json").read_text())["dataset"] == "Toys_and_Games"
    write_report(tmp_path, "gpu", {"ar_mid": {"model_name_or_path": "Qwen/Qwen3-0.6B"}})
    assert "| AR teacher model | `Qwen/Qwen3-0.6B` (pretrained) |" in (tmp_path / "report.md").read_text()


def test_ctrl_c_says_what_was_saved_and_the_resumed_stage_counts_all_its_time(tmp_path, monkeypatch, capsys):
    from diffgr2_trl.cli import console_main
    from diffgr2_trl.pipeline import runner

    calls = []

    def prepare(ctx, d):
        return {}

    def cft(ctx, d):
        calls.append(d)
        time.sleep(0.3)
        if len(calls) == 1:
            (d / "model" / "checkpoint-40").mkdir(parents=True)
            raise KeyboardInterrupt
        return {}

    monkeypatch.setattr(runner, "PIPELINE_STAGES", [("prepare", prepare), ("cft", cft)])
    monkeypatch.setattr(runner, "stage_inputs", lambda ctx: {})
    out = tmp_path / "run"
    argv = ["pipeline", "--preset", "smoke", "--output_dir", str(out)]
    assert console_main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    assert err[0].startswith("diffgr2 pipeline: interrupted during stage cft after 0 s. 1 finished stage(s) kept "
                             "(last: prepare); cft resumes from checkpoint-40.")
    assert err[0].endswith(f"Resume with: diffgr2 pipeline --preset smoke --output_dir {out}")
    assert not (out / "cft" / "stage.json").exists()
    assert console_main(argv) == 0
    assert "cft ... (run time so far 0.0 min; resuming: 1 earlier attempt(s), 0 s)" in capsys.readouterr().out
    record = json.loads((out / "cft" / "stage.json").read_text())
    assert record["attempts"] == 2 and record["wall_s"] >= 0.6  # both attempts' time
    assert not (out / "cft" / runner.ATTEMPTS).exists()


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


def test_one_stage_table_feeds_the_runner_checks_fingerprints_and_report():
    """stages.STAGES is the only list of stages: the runner's functions, the fingerprints' dependencies, the preset
    checks' sections and the report's rows are all derived from it; a new evaluation stage needs no code."""
    from diffgr2_trl.pipeline import report, runner, validate
    from diffgr2_trl.pipeline.stages import SECTIONS, STAGE_DEPENDENCIES, STAGES, Stage

    assert [n for n, _ in runner.PIPELINE_STAGES] == [s.name for s in STAGES]
    assert all(s.section is None or s.section in SECTIONS for s in STAGES)
    assert all(set(s.upstream) <= {t.name for t in STAGES[:i]} for i, s in enumerate(STAGES))  # upstream runs first
    assert list(STAGE_DEPENDENCIES) == [s.name for s in STAGES if s.name != "report"]
    assert set(validate.SECTION_ARGUMENTS) == set(SECTIONS) and validate.COMMAND_SECTIONS["grpo"] == "rl"
    assert report.TABLE_ROWS[2:4] == [("AR GR2 before RL (SFT)", "eval_sft"), ("AR GR2 (teacher)", "eval_ar")]
    extra = runner._stage_function(Stage("eval_extra", "evaluate", ("prepare", "cft"), evaluates="cft",
                                         decoder="block", report_row="CFT again"))
    assert callable(extra) and extra.__name__ == "eval_extra"
    with pytest.raises(RuntimeError, match="no stage_nope function"):
        runner._stage_function(Stage("nope", None))
    # the pipeline's own keys and their defaults live in the table too
    assert runner.pipeline_key({}, "decode", "taus") == [0.9, 0.7, 0.5, 0.3]
    assert runner.pipeline_key({"decode": {"taus": [0.5]}}, "decode", "taus") == [0.5]


def test_targets_table_fails_a_teacher_that_copies_its_input_and_reads_the_re_ranking_targets():
    from diffgr2_trl.pipeline.report import _targets

    floor = {"R@1": 0.30, "R@3": 0.55}
    evals = {"eval_ar": {"metrics": {"R@1": 0.32, "R@3": 0.60, "valid_rate": 1.0}},
             "eval_rl": {"metrics": {"R@1": 0.315, "R@3": 0.597, "valid_rate": 1.0}},
             "reference": {"metrics": {"R@1": 0.33, "R@3": 0.62, "valid_rate": 1.0}}}
    ci = {"diff": 0.02, "lo": 0.005, "hi": 0.03, "n": 100}
    wanted = {"teacher_copy_rate_max": 0.95, "teacher_r3_gain_points": 3.0, "teacher_r3_ci_lo_points": 0.0,
              "reference_r1_gain_points": 2.0, "final_r3_vs_teacher": 0.9, "final_top1_agreement": 0.9,
              "teacher_r1_min_gain_points": 1.0, "teacher_r1_ci_lo_points": 0.0}

    def met(cis):
        return {t["target"].split(" (")[0].split(" >=")[0].split(" <")[0]: t["met"]
                for t in _targets(evals, floor, [], cis, wanted)}

    cis = {"eval_ar": {"copy_rate": 0.96, "vs_floor": ci, "r3_vs_floor": {**ci, "diff": 0.05, "lo": 0.01}},
           "eval_rl": {"agreement": {"top1": 0.92, "exact": 0.5, "kendall_tau": 0.8, "n": 100}},
           "reference": {"vs_floor": ci}}
    got = met(cis)
    assert got["AR teacher copy rate"] is False  # 96% of its valid rankings are the input order
    assert got["AR teacher R@3"] is True and got["AR teacher R@1"] is True  # +5 points, CI above 0; +2, lo >= 0
    assert got["evidence ranker"] is True  # +3 points of R@1
    assert got["final ΔR@3"] is True and got["final top-1 agreement with the AR teacher"] is True  # +4.7 of +5; 92%
    cis["eval_ar"]["copy_rate"] = 0.60
    cis["eval_ar"]["r3_vs_floor"]["lo"] = -0.001
    cis["eval_rl"]["agreement"]["top1"] = 0.85
    got = met(cis)
    assert got["AR teacher copy rate"] is True and got["AR teacher R@3"] is False
    assert got["final top-1 agreement with the AR teacher"] is False


def test_targets_read_the_students_decoding_schedule_from_their_evaluation():
    from diffgr2_trl.pipeline.report import _targets

    evals = {"eval_cft": {"metrics": {"R@1": 0.3, "R@3": 0.5, "valid_rate": 0.5, "tokens_per_forward": 1.7},
                          "tau": 0.95, "block_size": 4},
             "eval_rl": {"metrics": {"R@1": 0.3, "R@3": 0.5, "valid_rate": 0.5}, "tau": 0.95, "block_size": 4}}
    decode = [{"method": "block_diffusion", "tau": 0.5, "constrained": False, "speedup_vs_ar": 3.0, "batch_size": 1},
              {"method": "block_diffusion", "tau": 0.95, "constrained": False, "speedup_vs_ar": 1.1, "batch_size": 1}]
    rows = {t["target"]: t for t in _targets(evals, None, decode, {}, {"speedup": 1.5})}
    assert rows["+ CFT valid >= 95% at tau=0.95, sub-blocks of 4"]["met"] is False
    assert "final valid >= 99.0% at tau=0.95, sub-blocks of 4" in rows
    speed = [t for name, t in rows.items() if name.startswith("decode speedup")]
    # only the evaluated tau's row is a target: tau 0.5's 3.0x is not what the students are judged at
    assert [t["target"] for t in speed] == ["decode speedup vs AR >= 1.5x at tau=0.95"] and speed[0]["met"] is False
