"""Property-based tests of the text parsers of user input (issue 27): --eps, --attack-opt,
--method-opt, --class-names, --class-map. Each returns a valid value or refuses in one line
(tests/fuzz_support.py); cases hypothesis found are kept as @example.
"""

from __future__ import annotations

import json
import math

from hypothesis import example, given
from hypothesis import strategies as st

from fuzz_support import assert_one_line_refusal, budget, outcome, run_cli

NUMBERISH = st.one_of(
    st.integers(-10**20, 10**20).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.tuples(st.integers(-300, 300), st.integers(-300, 300)).map(lambda t: f"{t[0]}/{t[1]}"),
    st.sampled_from(["nan", "NaN", "inf", "-inf", "Infinity", "1e400", "-0", "0x10", "1_000", " 8/255 ",
                     "8 / 255", "½", "٣", "1e-400", "08", "true", "null", "[1]", '{"a": 1}', "", "=", "."]),
    st.text(max_size=12),
)


# ------------------------------------------------------------------------------------ --eps


@budget(300)
@given(text=NUMBERISH, norm=st.sampled_from(["linf", "l2", "l1"]))
@example(text="1e400", norm="l2").via("an overflowing radius")
@example(text="255/1", norm="linf").via("the k/255 reading at its top")
def test_eps_expressions(text, norm):
    from robaudit.audit.engine import parse_eps

    kind, value = outcome(parse_eps, text, norm)
    if kind == "ok":
        assert isinstance(value, float) and math.isfinite(value) and value >= 0
        if norm == "linf":
            assert value <= 1


@budget(25)
@given(text=NUMBERISH)
def test_eps_on_the_command_line_refuses_in_one_line_and_writes_nothing(tmp_path_factory, text):
    out = tmp_path_factory.mktemp("eps") / "out"
    # a missing model: a valid --eps gets as far as loading it, a bad one stops earlier; both exit 2
    code, _, err = run_cli(["scan", out.parent / "missing.pt", "--dataset", "demo", "--limit", "2",
                            "--eps", text, "--attacks", "clean", "--out", out, "--device", "cpu"])
    assert_one_line_refusal(code, err)
    assert not out.exists()


# ------------------------------------------------------------------------ --attack-opt

ATTACK_NAMES = ["clean", "fgsm", "pgd", "cw", "tpgd", "aa", "square", "fmn"]
PARAMS = ["steps", "step_size", "random_start", "kappa", "temperature", "n_iter", "n_queries",
          "n_target_classes", "n_restarts", "p_init", "alpha_init", "alpha_final", "gamma_init",
          "gamma_final", "cap_factor", "top_fraction", "loss", "eps", "seed", "version"]
VALUES = st.one_of(NUMBERISH, st.sampled_from(["uniform", "normal", "none", "[0.1, 0.2]", "[]", "{}", '"x"',
                                               "1e308", "-1", "0", "1", "2.5", "10**9", "true"]))


def attack_opt():
    return st.one_of(
        st.tuples(st.sampled_from(ATTACK_NAMES + ["PGD", " pgd", "x"]), st.sampled_from(PARAMS), VALUES)
        .map(lambda t: f"{t[0]}.{t[1]}={t[2]}"),
        st.text(max_size=20),
    )


@budget(300)
@given(attacks=st.lists(st.sampled_from(ATTACK_NAMES), min_size=1, max_size=4, unique=True),
       pairs=st.lists(attack_opt(), max_size=3), norm=st.sampled_from(["linf", "l2", "l1"]))
@example(attacks=["pgd"], pairs=["pgd.steps=1e308"], norm="linf").via("a float where an int goes")
@example(attacks=["pgd"], pairs=["pgd.step_size=NaN"], norm="linf").via("JSON's NaN")
@example(attacks=["aa"], pairs=["aa.n_iter=[1]"], norm="linf").via("a list where an int goes")
@example(attacks=["pgd"], pairs=["pgd.steps=1e20"], norm="linf").via("an int too large to use")
def test_attack_opt_values(attacks, pairs, norm):
    from robaudit.audit.engine import ScanConfig, build_attacks
    from robaudit.cli import _parse_attack_opts

    def build():
        cfg = ScanConfig(out_dir=None, attacks=attacks, eps=8 / 255, norm=norm,
                         attack_overrides=_parse_attack_opts(pairs, None))
        return build_attacks(cfg)

    kind, built = outcome(build)
    if kind == "refused":
        return
    for attack in built.values():
        for key, value in attack.hparams.items():
            default = type(attack).defaults.get(key, value)
            if isinstance(default, bool):
                assert isinstance(value, bool)
            elif isinstance(default, (int, float)):
                assert isinstance(value, type(default)) and math.isfinite(value), (key, value)
        json.dumps(attack.hparams, allow_nan=False)   # results.json records them


# ------------------------------------------------------------------------ --method-opt

METHOD_KEYS = ["alpha", "beta", "loss_scale", "classwise_mean", "tau_bounds", "risk", "adapt",
               "reference_compat", "reweight", "weight_power", "beta_milestones", "warmup", "x",
               "eps", "fae", "uta", "lambda_", "temperature"]


@budget(300)
@given(method=st.sampled_from(["absld", "rslad", "fair-rslad", "ard", "fair-ard", "sat", "cfa", "frl", "trades",
                               "pgd-at", "ferd"]),
       pairs=st.lists(st.one_of(st.tuples(st.sampled_from(METHOD_KEYS), VALUES).map(lambda t: f"{t[0]}={t[1]}"),
                                st.text(max_size=15)), max_size=3))
@example(method="absld", pairs=["alpha=abc"]).via("a word where a number goes")
@example(method="absld", pairs=["tau_bounds=abc"]).via("a word where a pair goes")
@example(method="absld", pairs=["tau_bounds=[1]"]).via("a pair of one")
@example(method="absld", pairs=["beta_milestones=1.5"]).via("a number where a list goes")
@example(method="absld", pairs=["classwise_mean=maybe"]).via("a word where a flag goes")
def test_method_opt_values_are_checked_before_anything_is_loaded(method, pairs):
    """What passes the pre-flight check (check_config, before data, teacher or any write)
    must build the method; what the method would refuse must be refused by the check."""
    from robaudit.cli import _method_options
    from robaudit.remediate import METHODS
    from robaudit.remediate.base import RemediationMethod, create_method
    from robaudit.remediate.common import RemediateConfig

    kind, method_cls = outcome(METHODS.get, method)
    if kind == "refused":
        return

    def preflight():
        options = _method_options(method_cls, pairs, {})
        cfg = RemediateConfig(out_dir=None, method=method_cls.name, method_options=options)
        method_cls.check_config(cfg, 1)
        return cfg

    kind, cfg = outcome(preflight)
    if kind == "refused" or not issubclass(method_cls, RemediationMethod):
        return
    built = create_method(cfg.method, 10, eps=cfg.eps, step_size=cfg.step_size, steps=cfg.steps,
                          norm=cfg.norm, seed=cfg.seed, dataset="cifar10", student_arch="resnet18",
                          **cfg.method_options)
    json.dumps(built.options(), default=str)


# --------------------------------------------------------------- --class-names / --class-map

NAME = st.one_of(st.text(max_size=8), st.sampled_from(["cat", "dog", "<b>x</b>", "a,b", " ", "\ufeff", "0"]))


@budget(200)
@given(body=st.one_of(st.lists(NAME, max_size=5).map("\n".join),
                      st.lists(st.sampled_from(["cat", "dog", "c0", "c1", "eel", "<i>", "é"]), min_size=1,
                               max_size=4, unique=True).map("\n".join),
                      st.lists(st.one_of(NAME, st.integers(-3, 9), st.floats(), st.none(), st.booleans(),
                                         st.lists(st.integers(), max_size=2)), max_size=5).map(json.dumps),
                      st.binary(max_size=40)),
       count=st.integers(1, 4))
@example(body=b"\xff\xfe\x00", count=2).via("not utf-8")
@example(body='[1e999, "a"]', count=2).via("JSON's Infinity in a list of names")
def test_class_names_files(tmp_path_factory, body, count):
    from robaudit.audit.data.class_maps import read_class_names

    path = tmp_path_factory.mktemp("names") / "names.txt"
    path.write_bytes(body if isinstance(body, bytes) else body.encode("utf-8", "surrogatepass"))
    classes = [f"c{k}" for k in range(count)]
    kind, names = outcome(read_class_names, str(path), classes)
    if kind == "ok":
        assert len(names) == count and len(set(names)) == count
        assert all(isinstance(n, str) and n and n == n.strip() for n in names)


@budget(200)
@given(spec=st.one_of(
    st.permutations([0, 1, 2]), st.permutations(["c0", "c1", 2]),
    st.permutations([0, 1, 2]).map(lambda p: {str(k): v for k, v in enumerate(p)}),
    st.lists(st.one_of(st.integers(-2, 5), st.sampled_from(["c0", "c1", "c2", "zz"]), st.floats(), st.none(),
                       st.booleans()), max_size=4),
    st.dictionaries(st.one_of(st.integers(-2, 5).map(str), st.text(max_size=3)),
                    st.one_of(st.integers(-2, 5), st.sampled_from(["c0", "c1", "c2", "zz", " 1", "-0"]), st.none(),
                              st.floats(), st.text(max_size=3)), max_size=4),
    st.text(max_size=20), st.binary(max_size=20)),
    as_file=st.booleans())
@example(spec=[0, 1, True], as_file=False).via("a flag where an index goes")
@example(spec={"1.5": 0, "0": 1, "2": 2}, as_file=False).via("a fractional model index")
@example(spec=[0.0, 1.0, 2.0], as_file=True).via("float indices")
@example(spec=["\u00b2", 0, 1], as_file=False).via("a superscript digit: str.isdigit() but not int()")
def test_class_map_specs(tmp_path_factory, spec, as_file):
    from robaudit.audit.data.class_maps import resolve_class_map

    classes = ["c0", "c1", "c2"]
    if as_file or isinstance(spec, (str, bytes)):
        path = tmp_path_factory.mktemp("map") / "map.json"
        if isinstance(spec, bytes):
            path.write_bytes(spec)
        else:
            path.write_text(spec if isinstance(spec, str) else json.dumps(spec), encoding="utf-8",
                            errors="surrogatepass")
        spec = str(path)
    kind, mapping = outcome(resolve_class_map, spec, classes)
    if kind == "ok":
        targets = list(mapping.values()) if isinstance(mapping, dict) else list(mapping)
        assert all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 3 for t in targets)
        assert len(set(targets)) == len(targets)
