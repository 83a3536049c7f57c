"""bench/sweep.py's bookkeeping, without training: which adapter a run starts from, and which config the
table marks as chosen (by which dev split)."""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import sweep  # noqa: E402


def selected(stage2):
    """As if this run's stage 2 had made its DASA selection."""
    stage2.mkdir(parents=True)
    for f in ("dasa_selected.jsonl", "ood_report.json"):
        (stage2 / f).write_text("{}\n")


def test_stage1_from_fills_the_seed_and_the_grid_keys(tmp_path, monkeypatch):
    """Catches a run that starts from another config's adapter (or a KeyError) when --stage1_from names a grid
    key, as the batch sweep does: each batch size's stages 2-3 must continue that batch size's stage 1, and
    must not reuse the DASA selection another batch size's adapter made."""
    monkeypatch.setattr(sweep, "ROOT", tmp_path)
    for b in ("16", "32"):
        for seed in (0, 1):
            (tmp_path / f"b{b}_seed{seed}" / "stage1").mkdir(parents=True)
            (tmp_path / f"b{b}_seed{seed}" / "stage1" / "who").write_text(f"{b}/{seed}")
    args = sweep.get_args(["t_stage1_from", "--stages", "2,3", "--grid", "batch_size=16,32",
                           "--stage1_from", str(tmp_path / "b{batch_size}_seed{seed}")])
    for config in sweep.configs(args):
        out = sweep.run_dir(args, config, 1)
        out.mkdir(parents=True)
        sweep.copy_start(args, out, 1, config)
        assert (out / "stage1" / "who").read_text() == f"{config['batch_size']}/1"
        assert not (out / "stage2").exists()
        selected(out / "stage2")


def row(config, stage, split, f1, seed=0):
    return {"config": config, "stage": stage, "scored_on": split, "macro_f1": f1, "ece": 0.1, "seed": seed, "minutes": 1.0}


def test_table_chooses_stage1_by_id_dev_and_later_stages_by_the_dev_mean():
    """Catches a stage-1 choice that reads ood_dev (stage 1 trains on ID rows only) and a stage-3 choice that
    reads id_dev alone (stages 2-3 are there for OOD)."""
    results = [row({"lr": "a"}, "1", "id_dev", 0.50), row({"lr": "a"}, "1", "ood_dev", 0.10),
               row({"lr": "b"}, "1", "id_dev", 0.49), row({"lr": "b"}, "1", "ood_dev", 0.60),
               row({"r": "a"}, "3", "id_dev", 0.50), row({"r": "a"}, "3", "ood_dev", 0.40),
               row({"r": "b"}, "3", "id_dev", 0.45), row({"r": "b"}, "3", "ood_dev", 0.50)]
    lines = sweep.table(results)
    assert [line.split(" | ")[1] for line in lines if "**" in line] == ["**lr=a**", "**r=b**"]


def test_runs_from_one_adapter_share_its_selection(tmp_path, monkeypatch):
    """Catches a sweep over a stage-3 setting that computes the same DASA selection once per run (4,000 rows of
    features each) although every run continues the same stage-1 adapter."""
    monkeypatch.setattr(sweep, "ROOT", tmp_path)
    (tmp_path / "s1_seed0" / "stage1").mkdir(parents=True)
    args = sweep.get_args(["t_share", "--stages", "2,3", "--grid", "replay=1,2", "--stage1_from", str(tmp_path / "s1_seed{seed}")])
    first, second = sweep.configs(args)
    selected(sweep.run_dir(args, first, 0) / "stage2")
    out = sweep.run_dir(args, second, 0)
    out.mkdir(parents=True)
    sweep.copy_start(args, out, 0, second)
    assert (out / "stage2" / "dasa_selected.jsonl").exists() and (out / "stage1").is_dir()
