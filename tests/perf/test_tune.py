import io

from control import config
from lab.pytest_support import requires_root
from perf import paths, tune


def test_the_best_mean_wins_and_ties_go_to_fewer_workers_then_steering():
    w1, w2 = paths.Fastfwd(True, 1), paths.Fastfwd(True, 2)
    loose = paths.Fastfwd(True, 1, steering=False)
    assert tune.recommend([(w1, 5.0, 5.0), (w2, 6.0, 6.0), (loose, 5.5, 5.5)]) is w2
    assert tune.recommend([(w2, 6.0, 6.0), (w1, 6.0, 6.02)]) is w1
    assert tune.recommend([(loose, 6.0, 6.0), (w1, 6.0, 6.0)]) is w1
    assert tune.recommend([(loose, 7.0, 6.0), (w1, 6.0, 6.0)]) is loose


def test_the_recommendation_is_configuration_the_host_reads():
    lines = tune.config_lines(paths.Fastfwd(True, 1, steering=False))
    cfg = config.parse_text("\n".join(lines) + "\n", "tune")
    assert (cfg.workers, cfg.offload, cfg.steering) == (1, True, False)


@requires_root()
def test_tune_probes_in_a_lab_and_writes_its_recommendation(tmp_path):
    conf = tmp_path / "host.conf"
    conf.write_text("route 172.18.0.0/16\n")
    out = io.StringIO()
    choice = tune.run(1, 1, str(conf), out)
    text = out.getvalue()
    for name in ("compat-w1", "offload-w1", "offload-w1-unsteered"):
        assert f"probing fastfwd-{name} ... up " in text, text
    cfg = config.parse(str(conf))
    assert (cfg.workers, cfg.offload, cfg.steering) == (
        choice.workers, choice.offload, choice.steering,
    )  # fmt: skip
    assert str(next(iter(cfg.routes))) == "172.18.0.0/16"
