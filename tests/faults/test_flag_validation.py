"""Every numeric flag of every app is range-checked before any work starts, with a message
naming the flag; --seeds must name seeds.

References: the interval each flag's help implies (counts >= 1, fractions inside (0, 1),
rates > 0), written out here per case; "before any work" = the process exits without
creating its output directory.
"""

import functools
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
APPS = ("multitask_pt", "simclr_augment", "digits_reweighting", "noisy_labels",
        "cross_domain_fewshot", "lr_schedules", "task_meta_learning", "metaperturb_transfer")

# For one app per process: import it, then parse each case's flags and build its Config;
# prints {case: error message or null} and the numeric fields without bounds.
PROBE = """
import dataclasses, json, sys
from absl import app, flags
sys.argv = sys.argv[:1]
import apps.{name} as m
cases = json.loads(sys.argv_cases)
out = {{}}
for case in cases:
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["prog"] + case)
    try:
        m.Config.from_flags()
        out[" ".join(case)] = None
    except app.UsageError as e:
        out[" ".join(case)] = str(e)
import typing
numeric = (int, float, typing.Optional[int], typing.Optional[float])
unbounded = [f.name for f in dataclasses.fields(m.Config)
             if f.type in numeric and f.name not in m.Config.BOUNDS]
# what --helpshort lists: the app module's flags and the ones it adopts
helps = {{f.name: flags.FLAGS[f.name].help if f.name in flags.FLAGS else None
         for f in dataclasses.fields(m.Config)}}
print(json.dumps({{"cases": out, "unbounded": unbounded, "helps": helps,
                  "module_help": flags.FLAGS.module_help(m)}}))
"""


@functools.lru_cache(maxsize=None)
def probe_app(name):
    """One process per app: its BAD and GOOD cases, and the help of its Config's flags."""
    return probe(name, BAD[name] + GOOD[name])


def probe(name, cases):
    code = PROBE.format(name=name).replace("sys.argv_cases", repr(json.dumps(cases)))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


BAD = {
    "multitask_pt": [["--pt_epochs=-1"], ["--batch_size=0"], ["--test_fraction=1.5"],
                     ["--test_fraction=0"], ["--neumann_terms=-1"], ["--hyperstep_every=0"],
                     ["--meta_val_fraction=1"], ["--pt_lr=0"], ["--dropout=1"], ["--seeds="],
                     ["--seeds=0,0"], ["--split_tolerance=-0.1"], ["--hyperdistill_gamma=1.5"],
                     ["--arms=meta_online", "--dtype_policy=mixed_float16"]],
    "simclr_augment": [["--pt_epochs=0"], ["--batch_size=1"], ["--label_fraction=0"],
                       ["--temperature=0"], ["--unroll_steps=0"], ["--seeds="]],
    "digits_reweighting": [["--outer_steps=-5"], ["--label_noise=2"], ["--log_every=0"],
                           ["--inner_lr=0"], ["--num_train=1500"], ["--truncate=0"]],
    "noisy_labels": [["--noise_rate=1.5"], ["--epochs=0"], ["--evograd_copies=1"],
                     ["--evograd_sigma=0"], ["--lr=0"], ["--num_meta=5"], ["--verbose=3"],
                     ["--strategy=mirrored", "--arms=uniform,mwn_hyperdistill"],
                     ["--arms=uniform,bogus"]],
    "cross_domain_fewshot": [["--num_steps=0"], ["--train_n_way=5"], ["--k_shot=0"],
                             ["--test_n_way=11"], ["--test_shots=0"], ["--test_shots=5,5"],
                             ["--evograd_temperature=0"], ["--lr=0"], ["--test_episodes=0"],
                             ["--strategy=mirrored"], ["--arms=protonet,maml"]],
    "lr_schedules": [["--inner_steps=0"], ["--blocks=0"], ["--blocks=3000"],
                     ["--init_momentum=0"], ["--hand_momentum=1.5"], ["--outer_lr=0"],
                     ["--outer_momentum=1"], ["--momentum_range=0,0.9"],
                     ["--lr_range=1,0.5"], ["--clip_thresholds=0.1,0.1"],
                     ["--wd_range=-1,0"], ["--strategy=mirrored"], ["--arms=hand_tuned,sgdr"]],
    "task_meta_learning": [["--meta_steps=0"], ["--n_way=1"], ["--inner_lr=0"],
                           ["--meta_step_size=1.5"], ["--blocks=0"], ["--test_shots=0"],
                           ["--n_way=6"], ["--inner_batch=-1"], ["--strategy=mirrored"],
                           ["--cts_update_every=6"], ["--cts_meta_step_size=0"],
                           ["--arms=scratch,warp"], ["--warp_lr=0"],
                           ["--warpgrad_batch=-1"], ["--family=molecules"],
                           ["--num_molecules=10"], ["--gin_layers=0"],
                           ["--task_families=fragment,bogus"]],
    "metaperturb_transfer": [["--source_steps=0"], ["--source_batch=1"],
                             ["--source_batch=600"], ["--perturb_lr=-1"],
                             ["--dropout_rate=1"], ["--anneal_fraction=1.5"],
                             ["--test_samples=0"], ["--target_width=0"],
                             ["--strategy=mirrored"], ["--arms=base,warp"],
                             ["--target_batch=50", "--target_train_per_class=4"]],
}
GOOD = {"multitask_pt": [[], ["--neumann_terms=0", "--hyper_lr=0"]],
        "simclr_augment": [[], ["--num_pt=0"]],
        "digits_reweighting": [[], ["--label_noise=0", "--checkpoint_every=0"]],
        "noisy_labels": [[], ["--noise_rate=0", "--meta_lr=0", "--num_train=0"],
                         ["--strategy=mirrored"]],
        "cross_domain_fewshot": [[], ["--ft_lr=0", "--test_shots=1", "--ft_gamma_init=-2"]],
        "lr_schedules": [[], ["--outer_steps=0", "--init_lr=0", "--momentum_range=1,1"]],
        "task_meta_learning": [[], ["--rotations=4", "--n_way=10", "--inner_batch=0"],
                               ["--family=molecules", "--n_way=2"]],
        "metaperturb_transfer": [[], ["--perturb_lr=0", "--dropout_rate=0",
                                      "--anneal_fraction=0", "--arms=metaperturb_one_step"]]}


@pytest.mark.parametrize("name", APPS)
def test_every_numeric_flag_is_range_checked_with_a_message_naming_it(name):
    result = probe_app(name)
    assert result["unbounded"] == []
    for case in BAD[name]:
        message = result["cases"][" ".join(case)]
        flag = case[0].split("=")[0]
        assert message is not None and message.startswith(flag), (case, message)
    for case in GOOD[name]:
        assert result["cases"][" ".join(case)] is None, case


@pytest.mark.parametrize("name", APPS)
def test_every_setting_is_a_flag_explained_in_the_help(name):
    """Every field of the app's Config is a flag with a help text, listed by --helpshort
    (absl's module help of the app: its flags and the runner's it adopts)."""
    result = probe_app(name)
    for field, text in result["helps"].items():
        assert text, f"{name}: --{field} is not a flag, or has no help text"
        assert (f"--{field}:" in result["module_help"]
                or f"--[no]{field}:" in result["module_help"]), (name, field)


def test_helpshort_prints_the_usage_and_the_flags():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "apps", "task_meta_learning.py"),
                           "--helpshort"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert "Meta-learning across a task family" in proc.stdout
    for flag in ("--warpgrad_points:", "--[no]zero_head:", "--output_dir:", "--[no]resume:"):
        assert flag in proc.stdout, flag


def test_a_bad_flag_stops_the_app_before_any_work(tmp_path):
    out = tmp_path / "never"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "apps", "multitask_pt.py"),
                           f"--output_dir={out}", "--neumann_terms=-1"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 1
    assert "--neumann_terms=-1: must lie in [0, inf)" in proc.stderr + proc.stdout
    assert not out.exists()
