"""fastjac.models: the builders' shapes and structure, and the ResNet on the stacked engine against the
reference (train and eval mode: logits, penalties of both modes and targets, every parameter gradient)."""
import copy

import pytest
import torch
from torch import nn

from fastjac import Ensemble, JacobianReg, models, reference, sgd_uap
from tests.engine_cases import (F64, assert_logits_match_reference, assert_penalty_matches_reference, make_input,
                                make_projections, reference_penalty)
from tests.helpers import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("arch", list(models.ARCHITECTURES))
def test_every_architecture_maps_28x28_to_ten_logits_and_is_fused(arch):
    member = models.build(arch)
    assert member(torch.rand(2, *models.INPUT_SHAPE)).shape == (2, 10)
    for train in (True, False):
        ensemble = Ensemble([models.build(arch) for _ in range(2)]).train(train)
        assert ensemble.fused(), f"{arch} should run on the stacked engine ({ensemble.unsupported})"


@pytest.mark.parametrize("depth, blocks", [(8, 3), (20, 9)])
def test_resnet_structure(depth, blocks):
    net = models.resnet(depth=depth, width=16)
    block_list = [m for m in net.modules() if isinstance(m, models.BasicBlock)]
    assert len(block_list) == blocks
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 2 * blocks + 2, "stem, two per block, two 1x1 projection shortcuts"
    assert all(m.bias is None for m in convs), "every conv is followed by a BatchNorm"
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == len(convs)
    widths = [block.conv2.out_channels for block in block_list]
    assert widths == sorted(widths) and {widths[0], widths[-1]} == {16, 64}
    shapes = []
    hooks = [b.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape[1:]))) for b in block_list]
    net(torch.rand(2, *models.INPUT_SHAPE))
    for hook in hooks:
        hook.remove()
    per_stage = blocks // 3
    assert shapes[per_stage - 1] == (16, 28, 28) and shapes[2 * per_stage - 1] == (32, 14, 14) \
        and shapes[-1] == (64, 7, 7)


@pytest.mark.parametrize("depth", [0, 7, 9, "8", True])
def test_resnet_rejects_bad_depths(depth):
    with pytest.raises(ValueError, match="resnet depth must be an int 6n"):
        models.resnet(depth=depth)
    with pytest.raises(ValueError, match="resnet width must be an int >= 1"):
        models.resnet(width=0)


def test_build_names_the_known_architectures():
    assert isinstance(models.build("resnet", depth=20, width=4), models.ResNet)
    with pytest.raises(ValueError, match="unknown architecture 'vgg'; known: mlp, lenet, resnet"):
        models.build("vgg")


def make_resnet_case(members, train):
    torch.manual_seed(0)
    mods = [models.resnet(depth=8, width=4).to(F64).train(train) for _ in range(members)]
    generator = torch.Generator().manual_seed(1)
    for member in mods:  # away from the initial BatchNorm state, so that every term shows in eval mode
        for layer in member.modules():
            if isinstance(layer, nn.BatchNorm2d):
                with torch.no_grad():
                    layer.weight.uniform_(0.5, 1.5, generator=generator)
                    layer.bias.uniform_(-0.5, 0.5, generator=generator)
                    layer.running_mean.uniform_(-0.2, 0.2, generator=generator)
                    layer.running_var.uniform_(0.5, 1.5, generator=generator)
    return mods, Ensemble(copy.deepcopy(mods)).train(train), make_input(3)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.usefixtures("passes")
def test_resnet_logits_match_reference(train):
    mods, ensemble, x = make_resnet_case(3, train)
    assert_logits_match_reference(mods, ensemble, x, None, "resnet")


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("mode", ["vjp", "jvp"])
@pytest.mark.parametrize("target", ["members", "ensemble"])
@pytest.mark.usefixtures("passes")
def test_resnet_penalty_matches_reference(train, mode, target):
    mods, ensemble, x = make_resnet_case(2, train)
    assert_penalty_matches_reference(mods, ensemble, x, mode, target, make_projections(mode, 2, x, 10), None,
                                     "resnet")


def test_resnet_members_round_trip():
    mods, ensemble, x = make_resnet_case(2, False)
    for original, member in zip(mods, ensemble.members()):
        assert isinstance(member, models.ResNet)
        assert torch.equal(member(x), original(x))


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.usefixtures("passes")
def test_resnet_hoffman_style_jacobian_reg_uses_the_recorded_pass(train):
    """``y = ens(x)`` with x requiring grad records the engine's tape (BatchNorm's saved state included);
    ``JacobianReg`` then equals half the ensemble-target penalty for the same projections, and the
    running statistics moved once (one forward)."""
    mods, ensemble, x = make_resnet_case(2, train)
    x = x.requires_grad_(True)
    y = ensemble(x)
    torch.manual_seed(7)
    value = JacobianReg(1)(x, y)
    torch.manual_seed(7)
    v = reference.sphere_projections(1, x.shape[0], 10, dtype=F64)
    expected = 0.5 * reference_penalty(mods, x.detach(), "vjp", "ensemble", v)
    assert_close(value, expected, rtol=1e-10, atol=0, name="JacobianReg on the ResNet")
    tracked = ensemble.buffers_by_name()["bn.num_batches_tracked"]
    assert tracked.tolist() == ([1, 1] if train else [0, 0])


@pytest.mark.usefixtures("passes")
def test_resnet_ensemble_sgd_uap_matches_reference():
    """An attack on a ResNet ensemble (eval mode: BatchNorm with its running statistics) runs on the
    engine and gives the reference's perturbation."""
    mods, ensemble, _ = make_resnet_case(2, False)
    batches = [(make_input(4, seed=s), torch.randint(0, 10, (4,), generator=torch.Generator().manual_seed(s)))
               for s in (1, 2)]
    result = sgd_uap(ensemble, batches, eps=0.1, epochs=2)
    expected, _ = reference.sgd_uap(reference.ensemble_model([m.eval() for m in mods]), batches, 0.1, epochs=2)
    assert_close(result.delta[0], expected, rtol=0, atol=1e-12, name="resnet UAP")
