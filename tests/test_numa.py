"""NUMA without a kernel: op mmap's ``node``, the per-node trees of
merge_across_nodes=0 in the emulator, the two-node guest's QEMU options, and
the host's "not applicable" for a node it lacks.

What two real nodes did is in tests/test_vm_numa.py (a debian:6.12 guest);
the recorded runs (``results/reference/<NUMA_REFERENCE>``) are re-judged here
with today's emulator, and with the per-node model switched off, which must
then disagree with the kernels.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from ksmbench.backends.host import HostSession
from ksmbench.backends.vm.boot import GuestRun, numa_qemu_opts
from ksmbench.emulator import predict
from ksmbench.emulator.machine import Ksm
from ksmbench.errors import NotApplicable, ScenarioError, VMError
from ksmbench.kernel.features import memory_nodes
from ksmbench.scenario import NUMA_SET, parse_scenario, resolve_scenarios
from ksmbench.scenario import model as m
from ksmbench.scenario.serialise import to_toml

ROOT = Path(__file__).resolve().parents[1]
PROFILES = ("linux-6.1", "linux-6.12.117", "linux-6.18.44")


def numa_scenarios() -> list[m.Scenario]:
    return resolve_scenarios([NUMA_SET, str(ROOT / "ksmbench/scenario/ltp/ksm06.toml")])


def unbound(scenario: m.Scenario) -> m.Scenario:
    """The same scenario with every region on node 0."""
    steps = tuple(dataclasses.replace(s, node=None) if isinstance(s, m.Mmap) else s
                  for s in scenario.steps)
    return dataclasses.replace(scenario, steps=steps)


def counters(points) -> list[tuple]:
    return [(p.step, p.scan, {k: v for k, v in p.values.items() if k.startswith("global.")})
            for p in points]


# -- the format --------------------------------------------------------------------

MMAP = '''name = "n"
description = "d"
[[step]]
op = "mmap"
region = "a"
pages = 4
{node}
[[step]]
op = "mmap"
region = "b"
pages = 4
'''


def test_mmap_node_is_optional_validated_and_written_back():
    plain = parse_scenario(MMAP.format(node=""))
    assert plain.steps[0].node is None and plain.numa_nodes == 1
    assert "node" not in to_toml(plain)
    bound = parse_scenario(MMAP.format(node="node = 1"))
    assert bound.steps[0].node == 1 and bound.numa_nodes == 2
    assert parse_scenario(to_toml(bound)) == bound
    for bad, message in (("node = -1", "at least 0"), ("node = 64", "largest NUMA node"),
                         ('node = "1"', "integer")):
        with pytest.raises(ScenarioError, match=message) as e:
            parse_scenario(MMAP.format(node=bad))
        assert e.value.field == "node"


def test_the_numa_set_needs_two_nodes_and_only_it_and_ltp_ksm06_bind():
    assert [s.numa_nodes for s in numa_scenarios()] == [2] * 5
    from ksmbench.scenario import BUILTIN_SETS, builtin_set

    for kind in BUILTIN_SETS:
        assert all(s.numa_nodes == 1 for s in builtin_set(kind)), kind


# -- the emulator ----------------------------------------------------------------

@pytest.mark.parametrize("profile", PROFILES)
def test_every_expectation_of_the_numa_scenarios_is_predicted(profile):
    """The expect steps (written from LTP's and the kernel's rules, and held on
    two-node guests) are what the per-node model predicts."""
    for s in numa_scenarios():
        points = {(p.step, p.scan): p for p in predict(s, profile)}
        for step in s.steps:
            if isinstance(step, m.Expect):
                point = points[(step.index, None)]
                for metric, expected, observed, holds in step.check(point.values):
                    assert holds, (s.name, profile, step.index, metric, expected, observed)


@pytest.mark.parametrize("profile", PROFILES)
def test_merge_across_nodes_1_counts_as_on_one_node(profile):
    """With merge_across_nodes=1 where each region lies changes no counter."""
    for s in numa_scenarios():
        across = dataclasses.replace(s, ksm=dataclasses.replace(s.ksm, merge_across_nodes=True))
        steps = tuple(st for st in across.steps
                      if not (isinstance(st, m.Set) and st.tunable == "merge_across_nodes")
                      and not isinstance(st, m.Expect))
        across = dataclasses.replace(across, steps=steps)
        assert counters(predict(across, profile)) == counters(predict(unbound(across), profile))


@pytest.mark.parametrize("profile", PROFILES)
def test_merge_across_nodes_0_splits_merging_by_node(profile):
    """The same scenario with its regions on one node merges more: the split
    comes from the nodes, not from the tunable alone."""
    s = next(x for x in numa_scenarios() if x.name == "ltp-ksm06")
    two = {(p.step, p.scan): p.values for p in predict(s, profile)}
    one = {(p.step, p.scan): p.values for p in predict(unbound(s), profile)}
    after = (13, 2)  # the second scan after merge_across_nodes=0
    assert (two[after]["global.pages_shared"], two[after]["global.pages_sharing"]) == (2, 198)
    assert (one[after]["global.pages_shared"], one[after]["global.pages_sharing"]) == (1, 199)


def test_zero_pages_ignore_nodes():
    s = next(x for x in numa_scenarios() if x.name == "numa-zero-pages")
    last_scan = [p for p in predict(s, "linux-6.12.117") if p.op == "scan" and p.step == 8][-1]
    # 16 zero-filled pages per node: all 32 are KSM zero pages, on both nodes
    assert last_scan.values["global.ksm_zero_pages"] == 32
    assert last_scan.values["region.main.n1.zero_pfn"] == 16


def test_unstable_tree_page_of_another_node_is_refused_after_a_switch(monkeypatch):
    """The kernel's page_to_nid(tree_page) != nid test: without it the node-0
    pages would merge with the node-1 pages left in tree 0 by the batch
    before merge_across_nodes changed."""
    s = next(x for x in numa_scenarios() if x.name == "numa-partial-switch")

    def rest_of_scan():
        return [p for p in predict(s, "linux-6.12.117") if p.step == 9 and p.op == "scan"][-1]

    assert (rest_of_scan().values["global.pages_shared"],
            rest_of_scan().values["global.pages_unshared"]) == (0, 2)
    monkeypatch.setattr(Ksm, "_tree_page_elsewhere", lambda self, tframe, tree: False)
    assert rest_of_scan().values["global.pages_shared"] == 2


def test_each_nodes_tree_holds_its_own_chain():
    s = next(x for x in numa_scenarios() if x.name == "numa-chains")
    from ksmbench.emulator.emulate import ScenarioRun
    from ksmbench.emulator.scan import full_scan

    run = ScenarioRun(s, "linux-6.12.117")
    for step in s.steps[:9]:
        run.apply(step)
    for _ in range(3):
        full_scan(run.ksm)
    k: Ksm = run.ksm
    assert sorted(k.roots) == [0, 1]
    chains = {tree: [n for n in root.inorder() if n.is_chain] for tree, root in k.roots.items()}
    assert {t: [len(c.dups) for c in cs] for t, cs in chains.items()} == {0: [6], 1: [5]}
    assert all(d.tree == t for t, cs in chains.items() for c in cs for d in c.dups)
    k.check()


# -- kernels without the node --------------------------------------------------------

def test_memory_nodes_reads_has_memory(tmp_path):
    (tmp_path / "has_memory").write_text("0-1,3\n")
    assert memory_nodes(str(tmp_path)) == frozenset({0, 1, 3})
    assert memory_nodes(str(tmp_path / "missing")) is None


def bare_session() -> HostSession:
    """A host session with only what check_applicable reads for these
    scenarios: the /proc to look for swap in, and no guest swap device."""
    from ksmbench.kernel.procfs import ProcFS

    session = HostSession.__new__(HostSession)
    session.procfs, session.swap, session.swap_unavailable = ProcFS(), None, None
    return session


def test_a_node_the_kernel_lacks_makes_the_scenario_not_applicable(monkeypatch):
    s = next(x for x in numa_scenarios() if x.name == "ltp-ksm06")
    session = bare_session()
    monkeypatch.setattr("ksmbench.kernel.features.memory_nodes", lambda: frozenset({0}))
    with pytest.raises(NotApplicable, match=r"needs NUMA node 1 \(op mmap, node\) and this "
                                            r"kernel has memory on node 0 only"):
        session.check_applicable(s)
    monkeypatch.setattr("ksmbench.kernel.features.memory_nodes", lambda: None)
    with pytest.raises(NotApplicable, match="no NUMA"):
        session.check_applicable(s)
    monkeypatch.setattr("ksmbench.kernel.features.memory_nodes", lambda: frozenset({0, 1}))
    session.check_applicable(s)  # both nodes there: runs


def test_this_hosts_single_node_reads_not_applicable():
    """This machine has one node: the scenarios that bind node 1 are n/a."""
    nodes = memory_nodes()
    if nodes is None or 1 in nodes:
        pytest.skip(f"this machine's NUMA nodes with memory: {nodes}")
    session = bare_session()
    for s in numa_scenarios():
        with pytest.raises(NotApplicable, match="needs NUMA node 1"):
            session.check_applicable(s)


# -- the two-node guest --------------------------------------------------------------

def test_qemu_options_split_memory_and_put_every_cpu_on_node_0():
    assert numa_qemu_opts("2G", 2, 1) == []
    assert numa_qemu_opts("2G", 2, 2) == [
        "-object", "memory-backend-ram,id=ksmnuma0,size=1024M,merge=off",
        "-numa", "node,nodeid=0,memdev=ksmnuma0,cpus=0-1",
        "-object", "memory-backend-ram,id=ksmnuma1,size=1024M,merge=off",
        "-numa", "node,nodeid=1,memdev=ksmnuma1"]
    assert "size=512M" in numa_qemu_opts("1536M", 4, 3)[1]
    for memory in ("1001M", "300M", "2T"):
        with pytest.raises(VMError):
            numa_qemu_opts(memory, 2, 2)


def test_guest_argv_has_the_nodes_and_no_numa_balancing(tmp_path, monkeypatch):
    monkeypatch.setattr("ksmbench.backends.vm.boot.vng_binary", lambda: "vng")

    class Kernel:
        boot_image = tmp_path / "vmlinuz"

    def argv(nodes):
        return GuestRun(Kernel(), ["true"], shared_dir=tmp_path, accelerator="tcg",
                        cached_dirs=[], numa_nodes=nodes).vng_argv()

    two, one = argv(2), argv(1)
    qemu = next(a for a in two if a.startswith("--qemu-opts="))
    assert "-numa node,nodeid=1,memdev=ksmnuma1" in qemu and "mem-merge=off" in qemu
    assert two[two.index("numa_balancing=disable") - 1] == "--append"
    assert "-numa" not in next(a for a in one if a.startswith("--qemu-opts="))
    assert "numa_balancing=disable" not in one


def test_the_vm_backend_boots_as_many_nodes_as_the_scenarios_bind(monkeypatch):
    from ksmbench.backends.vm import backend as vmb
    from ksmbench.errors import UsageError
    from ksmbench.scenario import builtin_suite

    suite = builtin_suite()
    assert vmb.guest_numa_nodes(None, suite) == 1
    assert vmb.guest_numa_nodes(None, suite + numa_scenarios()) == 2
    assert vmb.guest_numa_nodes(3, suite) == 3
    far = parse_scenario(MMAP.format(node="node = 8"))
    with pytest.raises(UsageError, match="at most 8 nodes"):
        vmb.guest_numa_nodes(None, [far])
    monkeypatch.setattr(vmb._kernels, "check_spec", lambda spec, modules: None)
    monkeypatch.setattr(vmb._kernels, "label_for", lambda spec: spec)
    with pytest.raises(UsageError, match="1 to 8"):
        vmb.VMBackend("debian:6.12", numa_nodes=0)


# -- the recorded two-node runs, judged again ------------------------------------------

#: ``ksmbench run --kernel debian:6.12 --kernel debian:6.1 --jobs 1 numa
#: ksmbench/scenario/ltp/ksm06.toml``: guests booted with two nodes
NUMA_REFERENCE = ROOT / "results" / "reference" / "20261201-190105-1bea"


def rejudge(kernel: str, tmp_path: Path):
    from test_verdicts import Replay

    from ksmbench.compare.identify import load_rundir
    from ksmbench.emulator import Predictor
    from ksmbench.results import RunDir
    from ksmbench.runner import RunRecorder, Runner

    observed, releases = load_rundir(str(NUMA_REFERENCE))
    rundir = RunDir(tmp_path)
    try:
        return Runner([RunRecorder(rundir, predictor=Predictor())]).run_kernel(
            Replay(kernel, releases[kernel], observed.get(kernel, {}), {}), numa_scenarios())
    finally:
        rundir.close()


@pytest.mark.parametrize("kernel,cells", [("debian:6.12", 2573), ("debian:6.1", 1737)])
def test_recorded_two_node_guests_match_cell_by_cell(kernel, cells, tmp_path):
    import json

    meta = json.loads((NUMA_REFERENCE / "metadata.json").read_text())
    info = {k["kernel"]: k for k in meta["kernels"]}
    assert info[kernel]["numa_nodes"] == 2 and info[kernel]["numa_memory_nodes"] == [0, 1]
    outcome = rejudge(kernel, tmp_path)
    problems = [mm.describe() for o in outcome.scenarios.values() for mm in o.mismatches]
    assert problems == []
    assert sum(o.compared for o in outcome.scenarios.values()) == cells
    assert all(o.verdict == "match" and o.expect_checked and not o.expect_failures
               for o in outcome.scenarios.values())


@pytest.mark.parametrize("kernel", ["debian:6.12", "debian:6.1"])
def test_one_tree_for_all_nodes_disagrees_with_the_recorded_kernels(kernel, tmp_path, monkeypatch):
    """The per-node trees are what the kernels did: a model that keeps one
    tree whatever merge_across_nodes says mismatches every scenario that
    merges under merge_across_nodes=0."""
    monkeypatch.setattr(Ksm, "tree_of", lambda self, frame: 0)
    outcome = rejudge(kernel, tmp_path)
    wrong = {name for name, o in outcome.scenarios.items() if o.mismatches}
    assert wrong == {"numa-per-node-trees", "numa-chains", "numa-zero-pages", "ltp-ksm06",
                     "numa-partial-switch"}


def test_random_scenarios_bind_nodes_only_when_asked():
    from ksmbench.scenario.generate import random_scenario

    one = [random_scenario(seed) for seed in range(40)]
    assert all(s.numa_nodes == 1 for s in one)
    assert [random_scenario(seed, numa_nodes=1) for seed in range(40)] == one
    two = [random_scenario(seed, numa_nodes=2) for seed in range(40)]
    assert sum(s.numa_nodes == 2 for s in two) > 20
    assert any(not s.ksm.merge_across_nodes for s in two)
    for s in two:
        assert parse_scenario(to_toml(s), source=s.source) == s


def test_random_two_node_scenarios_never_merge_across_nodes_under_0():
    """At every step and scan of 120 random two-node scenarios: a page is
    always on its region's node, KSM pages included while merge_across_nodes
    is 0 (a merge never crosses nodes then), and every stable node sits in
    the tree of its page's node."""
    from ksmbench.emulator.emulate import ScenarioRun
    from ksmbench.emulator.scan import full_scan, partial_scan
    from ksmbench.scenario.generate import random_scenario

    checked = 0
    for seed in range(120):
        s = random_scenario(seed, numa_nodes=2)
        run = ScenarioRun(s, "linux-6.12.117")
        k = run.ksm

        def check():
            across = k.settings.merge_across_nodes
            for mm in k.mms.values():
                for seg in mm.segments:
                    frames = seg.pte[seg.pte > 0]
                    ksm = k.frames.node[frames] >= 0
                    own = frames if not across else frames[~ksm]
                    assert (k.frames.numa[own] == seg.numa).all(), (seed, seg.name)
            for tree, root in k.roots.items():
                for node in root.inorder():
                    for dup in (node.dups if node.is_chain else [node]):
                        assert dup.tree == tree
                        if not across and not k.stale(dup):
                            assert k.frames.numa[dup.kpfn] == tree, (seed, tree)
            k.check()

        for step in s.steps:
            if not run.supported(step):
                break
            if isinstance(step, m.Scan) and step.pages is not None:
                partial_scan(k, step.pages)
            elif isinstance(step, m.Scan):
                for _ in range(step.count):
                    full_scan(k)
                    check()
            else:
                run.apply(step)
            check()
            checked += 1
    assert checked > 1500


def test_a_child_allocating_on_node_0_disagrees_with_the_recorded_kernels(tmp_path, monkeypatch):
    """fork copies the VMA's policy: a model whose child faults pages on node 0
    mismatches numa-per-node-trees (its child's pages would join node 0's
    KSM page) and nothing else."""
    from ksmbench.emulator.machine import Segment

    copy = Segment.copy_for_fork

    def child_on_node_0(self, child):
        seg = copy(self, child)
        seg.numa = 0
        return seg

    monkeypatch.setattr(Segment, "copy_for_fork", child_on_node_0)
    outcome = rejudge("debian:6.12", tmp_path)
    assert {name for name, o in outcome.scenarios.items() if o.mismatches} == \
        {"numa-per-node-trees"}
