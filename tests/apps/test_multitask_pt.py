"""The graph experiment app end to end on a tiny preset.

References: the files and SavedModels the run must produce (`check_run`, applied to the
default run of tests/faults/test_kill_and_resume.py, which also kills and resumes it); the
exported fine-tuned model must score any number of graphs in the documented request format.
"""

import json
import os
import subprocess
import sys

import numpy as np
import tensorflow as tf

from tests.apps import run_pytest_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--max_pt_molecules=96", "--pt_epochs=2", "--ft_epochs=1", "--hidden=8", "--num_layers=1",
        "--batch_size=16", "--seeds=0", "--noxla", "--verbose=0", "--hyperstep_every=2",
        "--task_families=fragment,morgan", "--meta_val_batch_size=24", "--agreement_batches=3",
        "--noft_in_pt"]


def run(tmp_path, *extra):
    cmd = [sys.executable, os.path.join(ROOT, "apps", "multitask_pt.py"),
           f"--output_dir={tmp_path / 'run'}", f"--saved_models_dir={tmp_path / 'models'}", *TINY, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def check_run(run_dir, stdout, arms=("no_pt", "uniform", "meta")):
    """The summary, plot, table and exported SavedModel of a finished run of ``arms``."""
    summary = json.load(open(run_dir / "summary.json"))
    assert set(summary) == set(arms)
    for arm in summary.values():
        assert 0.0 <= arm["full_mean"] <= 1.0 and 0.0 <= arm["linear_mean"] <= 1.0
    record = json.load(open(run_dir / "results" / "meta_seed0.json"))
    assert len(record["task_weights"]) > 10 and record["pt_examples_per_second"] > 0
    # a quarter of the tasks are permuted controls: the weights' AUROC for "task is real"
    from sklearn.metrics import roc_auc_score
    names = sorted(record["task_weights"])
    assert "PT: 96 molecules" in stdout
    is_real = [name not in record["permuted_tasks"] for name in names]
    assert sum(is_real) == len(names) - round(0.25 * len(names))
    weights = np.array([record["task_weights"][n] for n in names])
    assert np.isclose(record["task_weight_auroc_real"], roc_auc_score(is_real, weights),
                      rtol=0, atol=1e-12)
    assert np.isclose(record["task_weight_moved_auroc_real"],
                      roc_auc_score(is_real, np.abs(weights - 1)), rtol=0, atol=1e-12)
    assert [e["epoch"] for e in record["task_weight_history"]] == [1, 2]
    assert record["task_weight_history"][-1]["auroc_real"] == record["task_weight_auroc_real"]
    assert set(record["mean_task_weight"]) == {f"{f} {k}" for f in ("fragment", "morgan")
                                               for k in ("real", "permuted")}
    agreement = record["hypergradient_agreement"]
    assert agreement["batches"] == 3 and -1.0 <= agreement["mean_cosine"] <= 1.0
    # per-task t tests against 0 (checked against scipy in multitask_pt_inprocess.py)
    for key in ("real_significant_share", "permuted_significant_share",
                "expected_direction_auroc_real", "expected_size_auroc_real"):
        assert 0.0 <= agreement[key] <= 1.0, key
    assert len(agreement["task_mean"]) == len(agreement["task_t"]) == len(names)
    assert f"PT: 96 molecules, {len(names)} tasks ({len(record['permuted_tasks'])} permuted" in stdout
    assert record["jit_compile"] is False  # --noxla
    # the GIN's BatchNorm leaves the padding out: results stored before are not taken for these
    assert record["config"]["gin_batch_statistics"] == "real_nodes"
    assert (run_dir / "task_weights_seed0.png").stat().st_size > 10_000
    assert "| meta |" in stdout and "FT split (scaffold, seed 0): train: " in stdout

    signature = tf.saved_model.load(record["saved_models"]["finetuned"]).signatures["serving_default"]
    inputs = signature.structured_input_signature[1]
    assert set(inputs) == {"node_features", "num_nodes", "edge_index", "edge_features",
                           "num_edges"}
    from keras_metapt.data import smiles_to_graph
    from keras_metapt.export import graph_request
    for smiles in (["CCO"], ["CCO", "c1ccccc1", "C", "CC(=O)O", "CCN"] * 5):  # 1 and 25 graphs
        request = graph_request([smiles_to_graph(s) for s in smiles])
        scores = signature(**{k: tf.constant(v) for k, v in request.items()})["outputs"].numpy()
        assert scores.shape == (len(smiles), 1) and np.all(np.isfinite(scores))


def test_in_process_checks():
    """tests/apps/multitask_pt_inprocess.py in its own process (the app's absl flags would
    clash with other modules' flags here)."""
    run_pytest_file("multitask_pt_inprocess.py", 2)


def test_app_pretrains_from_a_graph_tfds_directory(tmp_path):
    # PT data: 64 RDKit-shipped molecules with two fragment tasks, stored as a TFDS dataset.
    from keras_metapt.data import GraphDataset, embedded, smiles_to_graph
    from keras_metapt.data.tfds_graphs import write_graph_tfds
    smiles = embedded.pretraining_smiles(64)
    labels, tasks = embedded.fragment_labels(smiles)
    data = GraphDataset([smiles_to_graph(s) for s in smiles], labels[:, :2], tasks[:2])
    directory = write_graph_tfds({"train": data}, "pt_mols", str(tmp_path / "tfds"))
    # the uniform arm: the meta arm reads the same PT dataset (its hypersteps are tested on
    # the embedded molecules), at twice the cost
    out = run(tmp_path, f"--pt_tfds={directory}", "--arms=uniform", "--baseline=uniform")
    assert "PT: 64 molecules, 2 tasks" in out
    record = json.load(open(tmp_path / "run" / "results" / "uniform_seed0.json"))
    assert 0.0 <= record["test_auroc_full"] <= 1.0 and record["pt_examples_per_second"] > 0


def test_app_pretrains_on_two_mirrored_devices(tmp_path):
    """Both PT arms under MirroredStrategy over 2 logical CPU devices: one graph batch per
    replica per step; the run finishes, records 2 replicas, and the meta arm learned weights."""
    cmd = [sys.executable, "-m", "tests.two_cpus", os.path.join(ROOT, "apps", "multitask_pt.py"),
           f"--output_dir={tmp_path / 'run'}", f"--saved_models_dir={tmp_path / 'models'}", *TINY,
           "--arms=uniform,meta", "--strategy=mirrored", "--devices=/cpu:0,/cpu:1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Pre-training on 2 replicas" in proc.stdout
    for arm in ("uniform", "meta"):
        record = json.load(open(tmp_path / "run" / "results" / f"{arm}_seed0.json"))
        assert record["replicas"] == 2 and 0.0 <= record["test_auroc_full"] <= 1.0
    weights = np.array(list(record["task_weights"].values()))
    assert np.all(np.isfinite(weights)) and np.abs(weights - 1.0).max() > 0  # hypersteps moved phi


def test_meta_online_arm_runs_hyperdistill_over_every_pt_step(tmp_path):
    """--arms=meta_online: MetaPretrainer(online=HyperDistill(...)). References: the PT run's
    step count (96 molecules / 16 = 6 steps per epoch, 2 epochs, the warm-up epoch's steps
    counted by `advance`), the reference schedule (one at the first hyperstep at or after each
    multiple of --hyperdistill_every = 4 steps; the hypersteps are PT steps 7, 9 and 11, so
    references at 7 (for 4) and 9 (for 8); 12 is a regular step), and weights that moved from
    1."""
    out = run(tmp_path, "--arms=meta_online", "--baseline=meta_online", "--agreement_batches=0",
              "--hyperdistill_every=4", "--hyperdistill_reference_steps=2",
              "--hyperdistill_anchor_every=4")
    record = json.load(open(tmp_path / "run" / "results" / "meta_online_seed0.json"))
    assert record["hyperdistill_steps"] == 12
    assert record["hyperdistill_references"] == 2
    assert np.isfinite(record["hyperdistill_scale"])
    weights = np.array(list(record["task_weights"].values()))
    assert np.all(np.isfinite(weights)) and np.abs(weights - 1.0).max() > 1e-4
    assert "| meta_online |" in out
    assert (tmp_path / "run" / "task_weights_meta_online_seed0.png").exists()


def test_meta_online_on_several_replicas_stops_before_any_work(tmp_path):
    """HyperDistill runs on one replica: --arms=meta_online with 2 mirrored devices is a usage
    error naming the arm and the strategy, raised before the molecules are loaded."""
    cmd = [sys.executable, "-m", "tests.two_cpus", os.path.join(ROOT, "apps", "multitask_pt.py"),
           f"--output_dir={tmp_path / 'run'}", f"--saved_models_dir={tmp_path / 'models'}", *TINY,
           "--arms=meta_online", "--strategy=mirrored", "--devices=/cpu:0,/cpu:1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 1
    assert "--arms=meta_online runs on one replica, not 2 (--strategy=mirrored)" in proc.stderr
    assert "PT: " not in proc.stdout and not (tmp_path / "run" / "results").exists()


def test_xla_flag_really_compiles_with_xla(tmp_path):
    """Keras drops jit_compile (with a UserWarning) while op determinism is on; --xla must
    leave op determinism off so that the PT and FT steps compile with XLA. Reference: Keras'
    own warning text, present under --noxla's determinism if jit were requested. Also: the
    FT training molecules join the PT pool (--ft_in_pt, the default)."""
    cmd = [sys.executable, os.path.join(ROOT, "apps", "multitask_pt.py"),
           f"--output_dir={tmp_path / 'run'}", f"--saved_models_dir={tmp_path / 'models'}",
           *[f for f in TINY if f not in ("--noxla", "--noft_in_pt")], "--xla",
           "--arms=oracle", "--pt_epochs=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "doesn't support `jit_compile=True`" not in proc.stderr
    assert json.load(open(tmp_path / "run" / "results" / "oracle_seed0.json"))["jit_compile"]
    assert "| oracle |" in proc.stdout
    assert "PT: 909 molecules" in proc.stdout  # 96 + the 813 FT training molecules
