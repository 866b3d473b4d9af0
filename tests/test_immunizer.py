"""The amortized immunizer (tdae_jax/immunizer/): budget by construction and on disk, the training step (traced
once, sharded == unsharded, FDM and DPD in the parameter gradient), bit-identical resumption, the protect
workdir contract, and both commands end to end on the built-in tiny InstructPix2Pix surrogate.

The step tests use a small analytic per-image loss that reads the image, the text embedding, the per-image noise
and a "model" pytree passed as an argument (as the surrogate is), so they compile in seconds (FDM and DPD are
checked there); the end-to-end test runs the real objective (AdvDM) on the tiny surrogate. The measurement's
bookkeeping (per victim and purification, against a study's stored rows) runs on a shipped editor.
"""
import csv
import hashlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from experiments import immunizer as cli
from tdae_jax import checkpoint, configs, prng
from tdae_jax.immunizer import data as data_lib
from tdae_jax.immunizer import net, protect, train, trainer
from tdae_jax.parallel import mesh as meshlib

HW, T, D = 8, 3, 4
NET = net.NetConfig(eps=8.0 / 255.0, features=(4, 8), groups=2)
DPD = configs.DPD(enabled=True, period=2, steps=2)
DPD_BIG = configs.DPD(enabled=True, period=2, steps=2, step_size=0.1, eps=0.2)  # a visible counter-prompt
FD = configs.FDM(mode="finite_difference")


def model_tree():
    n_in = HW * HW * 3
    return {"w1": jax.random.normal(jax.random.key(41), (n_in, 8)) / np.sqrt(n_in),
            "p": jax.random.normal(jax.random.key(42), (D, 8)) / np.sqrt(D)}


def make_loss(model):
    """Per-image analytic loss: non-quadratic in the image (FDM's Hessian term is not zero), gated by the text
    embedding (DPD acts on it), with per-image noise from the keys."""

    def loss_fn(delta, batch, emb, keys):
        flat = (batch["x0"] + delta).reshape(delta.shape[0], -1)
        xi = jax.vmap(lambda k: jax.random.normal(k, flat.shape[1:]))(keys)
        gate = 1.0 + 0.5 * jnp.mean(jnp.tanh(emb @ model["p"]), axis=1)
        h = jnp.tanh(3.0 * flat @ model["w1"]) * gate
        return jnp.sum(h, -1) + jnp.sum(jnp.sin(7.0 * flat), -1) + 0.05 * jnp.sum(xi * flat, -1)

    return loss_fn


def batch_at(n, b=8):
    k1, k2 = jax.random.split(jax.random.fold_in(jax.random.key(7), n))
    return {"x0": np.asarray(jax.random.uniform(k1, (b, HW, HW, 3))),
            "uid": ((np.arange(b, dtype=np.int32) + n * b) * 7919) % 100003,
            "emb": np.asarray(0.2 * jax.random.normal(k2, (b, T, D)))}


def tcfg(fdm=FD, dpd=DPD):
    return train.TrainConfig(net=NET, fdm=fdm, dpd=dpd, lr=3e-3)


def test_budget_by_construction_for_any_params_and_input():
    params = jax.tree.map(lambda a: 50.0 * a + 3.0, net.init_params(NET, jax.random.key(0)))  # saturating
    module = net.Immunizer(NET)
    rng = np.random.default_rng(0)
    apply = jax.jit(module.apply)
    for x in (np.zeros((2, 16, 16, 3)), np.ones((2, 16, 16, 3)), rng.uniform(-2.0, 3.0, size=(2, 16, 16, 3)),
              np.where(rng.uniform(size=(2, 16, 16, 3)) > .5, 1., 0.), rng.uniform(size=(2, 7, 9, 3))):
        d = np.asarray(apply(params, jnp.asarray(x, jnp.float32)))
        assert d.shape == x.shape and np.isfinite(d).all()
        assert np.abs(d).max() <= NET.eps + 1e-7
        y = np.clip(x, 0, 1) + d
        assert y.min() >= -1e-7 and y.max() <= 1 + 1e-7
    x = rng.uniform(0.2, 0.8, size=(2, 16, 16, 3)).astype(np.float32)  # saturated: the budget is reached
    assert np.abs(np.asarray(apply(params, x))).max() > 0.9 * NET.eps


def test_shipped_network_loads_and_keeps_its_budget():
    shipped = Path(__file__).resolve().parents[1] / "tdae_jax" / "miniature" / "immunizer"
    cfg, params = protect.load(shipped)
    info = json.loads((shipped / "training.json").read_text())
    assert info["steps"] >= 1 and info["wall_seconds"] > 0 and abs(cfg.eps - 16 / 255) < 1e-9
    x = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    delta = np.asarray(jax.jit(net.Immunizer(cfg).apply)(params, x.astype(np.float32) / 255.0))
    assert 0 < np.abs(delta).max() <= cfg.eps + 1e-7 and net.count_params(params) < 1_000_000


def test_world_pool_batches_are_a_pure_function_of_the_step():
    idx = [data_lib.item_indices(n, 3, 6, 5151) for n in range(4)]
    np.testing.assert_array_equal(np.sort(np.concatenate(idx[:2])), np.arange(6))  # one epoch = the pool
    np.testing.assert_array_equal(idx[2], data_lib.item_indices(2, 3, 6, 5151))
    assert not np.array_equal(np.concatenate(idx[:2]), np.concatenate(idx[2:]))  # a fresh order per epoch
    pool = data_lib.WorldPool(None, 5151, 6, 32)
    b = pool.batch_at(1, 3)
    assert b["x0"].shape == (3, 32, 32, 3) and 0 <= b["x0"].min() and b["x0"].max() <= 1
    np.testing.assert_array_equal(b["uid"], prng.uids([f"world5151/{i}" for i in idx[1]]))


def test_train_step_traces_once_over_several_steps_and_dpd_rounds():
    traces = []

    def counted(model):
        traces.append(1)
        return make_loss(model)

    tr = trainer.Trainer(tcfg(), counted, meshlib.make_mesh(2), model_tree())
    st = tr.init(prng.base_key(0))
    rounds = []
    for n in range(5):
        st, m = tr.step(st, batch_at(n), prng.base_key(0))
        rounds.append(float(m["dpd/round"]))
    assert len(traces) == 1 and int(st.step) == 5
    assert rounds == [0.0, 1.0, 0.0, 1.0, 0.0]  # Algorithm 1's n = step + 1, S = 2
    assert float(m["budget/linf"]) <= NET.eps + 1e-7 and np.isfinite(float(m["fdm/z"]))


def _fit(mesh, steps, ckpt=None, meta=None):
    tr = trainer.Trainer(tcfg(), make_loss, mesh, model_tree())
    return trainer.fit(tr, batch_at, steps, prng.base_key(3), ckpt=ckpt, meta=meta or {"fingerprint": "x"})


def test_sharded_over_8_devices_equals_one_device():
    assert len(jax.devices()) >= 8
    s8, h8, _ = _fit(meshlib.make_mesh(8), 3)
    s1, h1, _ = _fit(meshlib.make_mesh(1), 3)
    chex_close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)  # noqa
    jax.tree.map(chex_close, s8.params, s1.params)
    np.testing.assert_allclose(h8["loss"], h1["loss"], rtol=1e-5, atol=1e-6)
    assert h8["dpd/round"] == [0.0, 1.0, 0.0]


def test_resume_after_a_stop_is_bit_identical(tmp_path):
    mesh = meshlib.make_mesh(2)
    full, hist_full, _ = _fit(mesh, 5)
    ck = checkpoint.UnitCheckpointer(tmp_path / "ckpt", 2)
    _, _, start0 = _fit(mesh, 3, ck)  # stopped after step 3 (saved at 2 and 3)
    ck.close()
    ck = checkpoint.UnitCheckpointer(tmp_path / "ckpt", 2)
    resumed, hist, start = _fit(mesh, 5, ck)
    ck.close()
    assert (start0, start) == (0, 3)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), full, resumed)
    assert set(hist) == set(hist_full)
    for k in hist:  # NaN (no DPD round) compares equal here
        np.testing.assert_array_equal(hist[k], hist_full[k], err_msg=k)
    ck = checkpoint.UnitCheckpointer(tmp_path / "ckpt", 2)  # other settings: not resumed
    with pytest.raises(ValueError, match="other settings"):
        _fit(mesh, 5, ck, meta={"fingerprint": "other"})
    ck.close()


@pytest.fixture(scope="module")
def grads():
    """``param_grads`` at step 1 (a DPD step with S = 2) and step 2 (not one), per configuration."""
    params = net.init_params(NET, jax.random.key(1))
    b = {k: jnp.asarray(v) for k, v in batch_at(0).items()}
    out = {}
    for name, cfg in {"off": tcfg(configs.FDM(), configs.DPD()), "fdm": tcfg(FD, configs.DPD()),
                      "gog": tcfg(configs.FDM(mode="exact_gog"), configs.DPD()),
                      "dpd": tcfg(configs.FDM(), DPD_BIG)}.items():
        fn = jax.jit(lambda p, s, cfg=cfg: train.param_grads(cfg, make_loss, p, b, prng.base_key(0), s,
                                                             model_tree()))
        out[name] = {s: fn(params, jnp.int32(s)) for s in (1, 2)}
    return params, b, out


def _rel(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    num = sum(float(jnp.sum((x - y) ** 2)) for x, y in zip(la, lb))
    return np.sqrt(num / sum(float(jnp.sum(y ** 2)) for y in lb))


def test_fdm_changes_the_parameter_gradient_and_matches_autodiff(grads):
    params, b, out = grads
    off = out["off"][2][0]
    d_fd, d_gog = (jax.tree.map(jnp.subtract, out[k][2][0], off) for k in ("fdm", "gog"))
    print("rel fdm-off", _rel(out["fdm"][2][0], off), "rel gog-off", _rel(out["gog"][2][0], off),
          "fd vs gog penalty", _rel(d_fd, d_gog))
    assert _rel(out["fdm"][2][0], off) > 1e-3  # the flatness term is in the gradient ...
    assert _rel(d_fd, d_gog) < 0.3  # ... and Eq. 9's finite difference is the penalty's gradient, to O(h)
    np.testing.assert_allclose(out["fdm"][2][1]["loss"], out["off"][2][1]["loss"], rtol=1e-6)
    # reference: reverse-mode through the network of J(theta) = mean_i [O_i + lam ||grad_delta O_i||]
    lam, loss_fn = configs.FDM(mode="exact_gog").lam, make_loss(model_tree())
    keys = prng.image_keys(prng.base_key(0), b["uid"], 2)

    def j(p):
        def o(d):
            v = loss_fn(d, b, b["emb"], keys)
            return jnp.sum(v), v

        g, v = jax.grad(o, has_aux=True)(net.Immunizer(NET).apply(p, b["x0"]))
        return jnp.mean(v + lam * jnp.sqrt(jnp.sum(g ** 2, axis=(1, 2, 3))))

    assert _rel(out["gog"][2][0], jax.grad(j)(params)) < 1e-4


def test_dpd_changes_the_gradient_on_its_steps_only(grads):
    _, _, out = grads
    g_dpd, m_dpd = out["dpd"][1]
    assert float(jnp.mean(m_dpd["dpd/round"])) == 1.0 and float(jnp.max(m_dpd["dpd/text_linf"])) > 0
    assert _rel(g_dpd, out["off"][1][0]) > 1e-3  # the counter-prompt changed the conditioning of the step
    assert np.all(np.asarray(m_dpd["dpd/loss_after"]) <= np.asarray(m_dpd["dpd/loss_before"]) + 1e-6)
    assert _rel(out["dpd"][2][0], out["off"][2][0]) == 0.0  # not a DPD step: the host gradient exactly


# ------------------------------------------------------------------------------------------- protect command


def _rgb(seed, h=40, w=48):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _digest(folder: Path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    """A saturating random network (its output reaches the budget: the on-disk check is not vacuous)."""
    d = tmp_path_factory.mktemp("net")
    params = jax.tree.map(lambda a: 50.0 * a, net.init_params(NET, jax.random.key(5)))
    protect.save(d, NET, params)
    return d


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    Image.fromarray(_rgb(0)).save(d / "good1.png")
    Image.fromarray(_rgb(1, 37, 29)).save(d / "good2.png")
    Image.fromarray(_rgb(2)).save(d / "good3.jpg", quality=95)
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    return d


def protect_run(argv):
    return cli.run_cli(["immunizer", "protect"] + argv)


def test_protect_workdir_contract(trained_dir, inputs, tmp_path, capsys):
    before = _digest(inputs)
    wd = tmp_path / "run"
    args = [f"--images={inputs}", f"--immunizer={trained_dir}", f"--workdir={wd}", "--size=32", "--batch_size=2",
            "--num_devices=2"]
    assert protect_run(args) == 1  # one bad file: a failed row, the others done
    with open(wd / "metrics.csv") as f:
        rows = {r["id"]: r for r in csv.DictReader(f)}
    assert {k: r["status"] for k, r in rows.items()} == {"corrupt": "failed", "good1": "done", "good2": "done",
                                                         "good3": "done"}
    assert "corrupt.png" in rows["corrupt"]["error"]
    for name in ("good1.png", "good2.png", "good3.jpg"):
        orig = np.asarray(Image.open(inputs / name).convert("RGB"), np.int32)
        out = np.asarray(Image.open(wd / "protected" / f"{Path(name).stem}.png"), np.int32)
        assert out.shape == orig.shape and out.dtype == np.int32
        linf = np.abs(out - orig).max()
        assert 0 < linf <= int(np.floor(NET.eps * 255 + 1e-6)), name  # budget-exact on disk, not a copy
        assert int(rows[Path(name).stem]["linf_255"]) == linf
    assert not (wd / "protected" / "corrupt.png").exists()
    for f in ("manifest.json", "metrics.jsonl", "report.html", "config.json", "git_revision.txt", "flags.flags"):
        assert (wd / f).is_file(), f
    assert _digest(inputs) == before  # originals untouched
    capsys.readouterr()
    assert protect_run(args) == 1  # resumed: the done images are skipped, the failed one stays failed
    assert "4 skipped" in capsys.readouterr().out  # done, and failed (not retried)


def test_protect_usage_errors_write_nothing(trained_dir, inputs, tmp_path, capsys):
    cases = [[f"--images={inputs}"],  # no --immunizer
             [f"--images={inputs}", f"--immunizer={tmp_path / 'missing'}"],
             [f"--images={tmp_path / 'nothing_here'}", f"--immunizer={trained_dir}"],
             [f"--images={inputs}", f"--immunizer={trained_dir}", "--eps=0.1"],
             [f"--images={inputs}", f"--immunizer={trained_dir}", f"--workdir={inputs}/inside"],
             [f"--images={inputs}", f"--immunizer={trained_dir}", "--batch_size=0"]]
    for k, extra in enumerate(cases):
        wd = tmp_path / f"wd{k}"
        argv = [f"--workdir={wd}"] + extra if not any(a.startswith("--workdir") for a in extra) else extra
        capsys.readouterr()
        assert protect_run(argv) == 2, extra
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err and "Traceback" not in err, err
        assert not wd.exists() and not (inputs / "inside").exists(), extra
    assert cli.run_cli(["immunizer"]) == 2  # no sub-command


# -------------------------------------------------------------------------- both commands, tiny surrogate


def test_train_then_protect_end_to_end_on_the_tiny_ip2p(tmp_path, inputs, capsys):
    """AdvDM on the built-in tiny ip2p (``models.tiny``; FDM and DPD are checked on the analytic loss above, at a
    fraction of the compile time), stopped and resumed by a longer run, then protect with the network it wrote."""
    train_wd = tmp_path / "train"
    base = ["immunizer", "train", f"--workdir={train_wd}", "--surrogate=ip2p", "--objective=advdm",
            "--timesteps=1", "--defense=none", "--net_features=4,8",
            "--net_groups=2", "--batch_size=2", "--num_devices=2", "--train_pool=4", "--train_world_seed=5151",
            "--ckpt_every=1", "--log_every=1", "--eps=0.03137254901960784"]
    assert cli.run_cli(base + ["--train_steps=2"]) == 0
    assert cli.run_cli(base + ["--train_steps=3"]) == 0
    assert "resumed from step 2" in capsys.readouterr().out
    curves = json.loads((train_wd / "curves.json").read_text())
    assert len(curves["loss"]) == 3 and curves["dpd/round"] == [0.0, 0.0, 0.0]
    assert all(np.isfinite(v) for v in curves["loss"]) and max(curves["budget/linf"]) <= 8 / 255 + 1e-6
    cfg, _ = protect.load(train_wd)
    assert cfg.features == (4, 8) and abs(cfg.eps - 8 / 255) < 1e-9
    assert cli.run_cli(["immunizer", "train", f"--workdir={tmp_path / 'bad'}", "--train_world_seed=31337"]) == 2
    assert not (tmp_path / "bad").exists()
    wd = tmp_path / "prot"
    assert protect_run([f"--images={inputs}", f"--immunizer={train_wd}", f"--workdir={wd}", "--size=32",
                        "--batch_size=2", "--num_devices=1"]) == 1
    assert len(list((wd / "protected").glob("*.png"))) == 3


def test_measure_compares_each_purification_and_the_worst_case_with_the_study_rows(tmp_path):
    """``measure.victim_rows`` on 4 pairs of a test seed with the shipped ip2p_a: the clean row is recomputed and
    checked against the stored one, the immunizer is compared with every stored row on the same pairs under each
    purification, and the worst case is the per-pair OR over the purifications (rows stored for all of them)."""
    from tdae_jax.evaluate import study as study_lib
    from tdae_jax.immunizer import measure
    from tdae_jax.miniature import shipped

    cfg = study_lib.StudyConfig(seed=5151, n=4, rows=("noise",), victims=("ip2p_a",), sdedit_victims=())
    sub = study_lib.pairs(cfg)
    sur = shipped.load("ip2p_a")
    clean = study_lib.edit_outcomes(sub["source"], sub, "ip2p_a", sur, cfg)
    key = lambda pur: study_lib.score_key("ip2p_a", pur, cfg)  # noqa: E731
    noise = {"none": [True, False, True, False], "jpeg75": [False, False, True, True]}
    (tmp_path / "scores").mkdir()
    (tmp_path / "scores" / "none__0__any.json").write_text(json.dumps({key("none"): clean}))
    (tmp_path / "scores" / "noise__8__any.json").write_text(json.dumps({key(p): v for p, v in noise.items()}))
    out = measure.victim_rows(tmp_path, 8, sub, sub["source"], "ip2p_a", sur, ("none", "jpeg75"), cfg)
    assert set(out) == {"none", "jpeg75", "worst"}
    assert set(out["none"]["rates"]) == {"none", "noise", "immunizer"}
    assert out["none"]["rates"]["immunizer"] == out["none"]["rates"]["none"]  # the identity "immunizer" is clean
    assert out["none"]["immunizer_vs"]["none"]["diff"] == 0.0
    assert set(out["jpeg75"]["rates"]) == {"noise", "immunizer"}  # no stored clean row under jpeg75
    assert out["worst"]["rates"]["noise"]["rate"] == 0.75  # [T,F,T,F] or [F,F,T,T]
    assert set(out["worst"]["rates"]) == {"noise", "immunizer"}
    (tmp_path / "scores" / "none__0__any.json").write_text(json.dumps({key("none"): [not c for c in clean]}))
    with pytest.raises(ValueError, match="not the same protocol"):
        measure.victim_rows(tmp_path, 8, sub, sub["source"], "ip2p_a", sur, ("none",), cfg)
