"""Training steps (forward, loss, backward, Adam step; B = 128, nproj = 1): the plain stacked step, the JR
steps on every backend, the user-loop, Hoffman-style and compiled steps, the reference JR step, the
torch.func peer, the generic path and the plain loop over members: every training row of the table."""
import pytest

from bench.suite import case_params
from fastjac.benchmark import KINDS, CaseSpec, count_flops

TRAINING = {name for name, kind in KINDS.items() if not name.startswith(("infer_", "uap"))}


@pytest.mark.parametrize("spec", case_params(TRAINING))
def test_training_step(run_case, spec):
    run_case(spec)


def test_flop_counts_match_the_layer_shapes():
    """The FLOPs one call executes (``count_flops``: the ATen ops it dispatches) equal DESIGN.md's counts
    from the layer shapes, written out here: for 784-256-256-10 with F = 2*B*sum(in*out) the forward,
    F_1 and F_L its first and last layer, a plain step is 3F - F_1, a jvp step 6F - 2F_1 (2x plain), a
    vjp step 6F - F_1 - F_L (2.33x plain), inference F, an SGD-UAP iteration 2F per perturbation (3F
    for the common implementation, which also forms parameter gradients); LeNet's inference is F from
    its convolution and Linear shapes. Every count scales with M. ``sgd_uap`` also runs the model once on
    one row before the attack (the check of the batches' sample shape against the model): F / B more."""
    batch, members = 8, 2
    macs = [784 * 256, 256 * 256, 256 * 10]
    forward, first, last = 2 * batch * sum(macs), 2 * batch * macs[0], 2 * batch * macs[-1]
    expected = {("plain", "auto", 1): 3 * forward - first, ("loop", "-", 1): 3 * forward - first,
                ("jr_jvp", "auto", 1): 6 * forward - 2 * first, ("jr_vjp", "auto", 1): 6 * forward - first - last,
                ("user_vjp", "auto", 1): 6 * forward - first - last, ("infer_stacked", "auto", 1): forward,
                ("infer_vmap", "-", 1): forward, ("uap", "auto", 4): 4 * 2 * forward + forward // batch,
                ("uap_common", "-", 4): 4 * 3 * forward}
    for (kind, backend, k), per_member in expected.items():
        counted = count_flops(CaseSpec(kind, "mlp", members, backend, k, batch))
        assert counted == members * per_member, f"{kind}: counted {counted}, expected {members * per_member}"
    assert abs((6 * forward - first - last) / (3 * forward - first) - 2.33) < 0.005  # DESIGN.md's 2.33x
    lenet_macs = [6 * 28 * 28 * 25, 16 * 10 * 10 * 6 * 25, 400 * 120, 120 * 84, 84 * 10]
    assert count_flops(CaseSpec("infer_stacked", "lenet", members, "auto", 1, batch)) == \
        members * 2 * batch * sum(lenet_macs)
