"""The paper's convolutional networks (--architecture conv): their layers, the routing in float64 with batch norm,
batch norm's running statistics through moving averages, checkpoints, resume and export (two processes:
tests/test_folder.py)."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from tests.conftest import tiny_config
from tests.test_step import make_inputs, reference_gradients
from vaegan_dist import VAEGAN
from vaegan_dist.checkpoint.contents import saved_config
from vaegan_dist.checkpoint.layout import checkpoints_dir
from vaegan_dist.checkpoint.reading import Checkpoint, newest_complete, verify
from vaegan_dist.config import ConfigError, TrainConfig
from vaegan_dist.hub.model import export_networks
from vaegan_dist.model.conv import ConvDecoder, ConvEncoder, ConvShape, conv_discriminator
from vaegan_dist.model.dropout import Dropout
from vaegan_dist.model.networks import PerNetwork, build_models, moving_averages, update_averages
from vaegan_dist.training.loop import train
from vaegan_dist.training.setup import sync_batch_norm
from vaegan_dist.training.step import adam_optimizers, routed_gradients, train_step

CONV = dict(architecture="conv", conv_width=0.0625, latent_dim=4, encoder_batch_norm=True)  # the paper's


def layers(module, kind):
    return [m for m in module.modules() if isinstance(m, kind)]


@pytest.mark.parametrize(("image_shape", "middle"), [((1, 28, 28), 192), ((3, 32, 32), 192), ((3, 64, 64), 256)])
def test_the_networks_are_the_papers_for_each_image_size(image_shape, middle):
    shape = ConvShape(image_shape, width=1.0)
    encoder, decoder = ConvEncoder(shape, 128), ConvDecoder(shape, 128)
    discriminator = conv_discriminator(shape, "hidden")
    assert [c.out_channels for c in layers(encoder, nn.Conv2d)] == [64, 128, 256]
    assert [c.out_channels for c in layers(decoder, nn.ConvTranspose2d)] == [middle, 128, 32]
    assert [c.out_channels for c in layers(discriminator, nn.Conv2d)] == [32, 128, middle, 256]
    assert [linear.out_features for linear in layers(encoder, nn.Linear)] == [1024, 128, 128]
    assert [linear.out_features for linear in layers(discriminator, nn.Linear)] == [512, 1]
    assert all(c.kernel_size == (5, 5) for c in layers(discriminator, nn.Conv2d | nn.ConvTranspose2d))
    pixels = image_shape[0] * image_shape[1] * image_shape[2]
    x = torch.rand(2, pixels) * 2 - 1
    mu, logvar = encoder(x)
    assert mu.shape == logvar.shape == (2, 128)
    assert decoder(mu).shape == (2, pixels) and decoder(mu).abs().max() <= 1
    logit, features = discriminator(x, with_similarity=True)
    side = -(-image_shape[1] // 8)
    assert logit.shape == (2, 1) and features.shape == (2, 256 * side * side)  # Dis_l: the third strided block
    plain = ConvEncoder(shape, 128, batch_norm=False)  # the default's: the same layers, biases for batch norm
    assert not layers(plain, nn.modules.batchnorm._BatchNorm)
    assert all(m.bias is not None for m in layers(plain, nn.Conv2d))
    weights = [[p.shape for p in net.parameters() if p.dim() > 1] for net in (plain, encoder)]
    assert weights[0] == weights[1]


def test_the_default_encoder_has_no_batch_norm_and_celeba64_has_the_papers():
    assert not layers(build_models(tiny_config(architecture="conv")).encoder, nn.modules.batchnorm._BatchNorm)
    assert layers(build_models(tiny_config(**CONV)).encoder, nn.BatchNorm2d)
    assert TrainConfig.preset("celeba64").encoder_batch_norm
    # a config.json of 0.6.0 names no encoder_batch_norm: its conv encoder had batch norm, so its export loads
    assert saved_config({"architecture": "conv"}).encoder_batch_norm
    assert not saved_config({"architecture": "conv", "encoder_batch_norm": False}).encoder_batch_norm


def test_the_discriminator_drops_out_before_every_layer_with_the_same_weights_at_any_rate():
    shape = ConvShape((1, 28, 28), width=0.0625)
    paper, dropping = conv_discriminator(shape, "hidden"), conv_discriminator(shape, "hidden", dropout=0.5)
    assert [m.p for m in layers(dropping, Dropout)] == [0.5] * 6
    assert paper.state_dict().keys() == dropping.state_dict().keys()
    x = torch.rand(4, 784)
    assert torch.equal(paper(x), paper(x)) and not torch.equal(dropping(x), dropping(x))


def test_sync_batchnorm_converts_every_batch_norm_on_several_gpus_and_is_one_line_on_cpus():
    def accelerator(processes, device):
        return SimpleNamespace(num_processes=processes, device=torch.device(device))

    networks = build_models(tiny_config(**CONV))
    keys = [net.state_dict().keys() for net in networks]
    assert sync_batch_norm(networks, accelerator(1, "cuda")) is networks  # nothing to sync with
    synced = sync_batch_norm(networks, accelerator(2, "cuda"))
    for net in synced:
        norms = layers(net, nn.modules.batchnorm._BatchNorm)
        assert norms and all(isinstance(m, nn.SyncBatchNorm) for m in norms)
    assert [net.state_dict().keys() for net in synced] == keys  # checkpoints and exports alike
    with pytest.raises(ConfigError, match="needs GPUs"):
        sync_batch_norm(networks, accelerator(2, "cpu"))
    with pytest.raises(ConfigError, match="needs --architecture conv"):
        tiny_config(sync_batchnorm=True)


@pytest.mark.parametrize("similarity", ["logit", "hidden"])
def test_routed_gradients_match_an_independent_formulation_with_batch_norm(similarity):
    """Batch norm makes each image's output depend on its batch: the reference sees the batches the step does
    ([z; z_p] in the decoder, [x; x̃; x_p] in the discriminator), in separate graphs per network's loss."""
    config = tiny_config(**CONV, similarity=similarity, generator_loss="minimax", pixel_weight=2.0,
                         prior_match_weight=1.0, dropout=0.0)
    torch.manual_seed(3)
    networks = [net.double() for net in build_models(config)]
    x, eps, z_p = make_inputs(config)
    routed = routed_gradients(*networks, x, eps, z_p, config)
    expected = reference_gradients(*networks, x, eps, z_p, config, batched=True)
    for name, net in zip(PerNetwork._fields, networks, strict=True):
        assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
        for got, want in zip(routed[name], expected[name], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
        assert max(want.abs().max() for want in expected[name]) > 0


def test_the_averages_take_the_running_statistics_of_the_trained_networks():
    config = tiny_config(**CONV)
    networks = build_models(config)
    averages = moving_averages(config, networks)
    networks.encoder(torch.rand(8, 784))  # train mode: the running statistics move
    update_averages(averages, networks, 0.999, step=100)
    for name in ("encoder", "decoder"):
        for average, trained in zip(getattr(averages, name).buffers(), getattr(networks, name).buffers(), strict=True):
            assert torch.equal(average, trained)


def test_a_skipped_step_keeps_the_running_statistics_it_had():
    config = tiny_config(**CONV)
    networks = build_models(config)
    optimizers = adam_optimizers(networks, config)
    before = [b.clone() for net in networks for b in net.buffers()]
    x = torch.rand(8, 784) * 2 - 1
    x[0, 0] = float("nan")
    assert not train_step(networks, optimizers, x, config).stepped
    assert all(torch.equal(a, b) for a, b in zip(before, (b for net in networks for b in net.buffers()), strict=True))
    assert train_step(networks, optimizers, x.nan_to_num(), config).stepped
    assert not all(torch.equal(a, b) for a, b in zip(before, (b for net in networks for b in net.buffers()),
                                                       strict=True))


@pytest.fixture(scope="module")
def conv_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("conv") / "run"
    config = tiny_config(**CONV, max_steps=4, save_every=2, ema_decay=0.9, output_dir=str(output_dir))
    assert train(config, Accelerator(cpu=True)) == 0
    return config, output_dir


def test_a_conv_run_resumes_bitwise_with_its_running_statistics(conv_run, tmp_path):
    config, straight = conv_run
    broken = shutil.copytree(straight, tmp_path / "broken")
    shutil.rmtree(checkpoints_dir(broken) / "step_0000004")
    (checkpoints_dir(broken) / "latest").write_text("step_0000002\n")
    assert train(config.__class__.from_dict({**config.to_dict(), "output_dir": str(broken)}),
                 Accelerator(cpu=True)) == 0
    last, resumed = (Checkpoint(newest_complete(checkpoints_dir(d), report=pytest.fail)) for d in (straight, broken))
    assert verify(resumed.path) is None
    for name in ("encoder", "decoder", "discriminator", "encoder_ema", "decoder_ema"):
        saved = last.network(name)
        assert any("running_mean" in key for key in saved)
        assert all(torch.equal(saved[key], value) for key, value in resumed.network(name).items()), name


def test_a_conv_export_loads_in_eval_mode_with_its_running_statistics(conv_run, tmp_path):
    _, output_dir = conv_run
    model = VAEGAN.from_pretrained(output_dir)  # the newest checkpoint's moving averages
    assert not model.training and model.config.architecture == "conv"
    for module in model.modules():  # a long run's count, beyond float16's largest number
        if isinstance(module, nn.BatchNorm2d):
            module.num_batches_tracked.fill_(150_000)
    export_networks(model.encoder, model.decoder, model.config, tmp_path / "export")  # float16
    again = VAEGAN.from_pretrained(tmp_path / "export")
    counts = [m.num_batches_tracked for m in again.modules() if isinstance(m, nn.BatchNorm2d)]
    assert counts and all(c.dtype == torch.int64 and c == 150_000 for c in counts)
    digits = model.sample(3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(again.reconstruct(digits), model.reconstruct(digits), rtol=0, atol=2e-2)  # float16
