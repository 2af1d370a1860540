"""The UNet conditioned on an image, a vector and a token sequence (and labels), through `Conditions`: shapes,
the default network unchanged, the learned nulls where rows are dropped, the padding mask, and the errors."""

import hashlib

import pytest
import torch
from test_config import DIGITS_YAML  # pytest puts tests/ on sys.path
from test_unet import TINY, inputs, perturb, tiny

from ddpm.conditions import Conditions
from ddpm.config import ConfigError, load_config
from ddpm.interop.diffusers import diffusers_unet_config
from ddpm.losses import diffusion_losses, drop_conditions, drop_labels
from ddpm.models import ClassicUNet
from ddpm.models.unet import UNet
from ddpm.samplers import sample
from ddpm.samplers.sampling import denoiser, model_denoiser
from ddpm.schedule import NoiseScheduler

# Every kind at once, each with its own width, so that a mixed-up width shows as a shape error.
ALL = dict(num_classes=3, cond_channels=2, cond_dim=5, context_dim=6)
KIND_OF = {"num_classes": "label", "cond_channels": "image", "cond_dim": "vector", "context_dim": "context"}


def conditions(n: int = 2, *, seed: int = 3, size: int = 8, **built) -> Conditions:
    """Random conditions for a network built with `built` (the arguments of ALL), row i distinct from row j;
    the context's last token of row 0 is padding."""
    generator = torch.Generator().manual_seed(seed)
    values = {}
    if built.get("num_classes"):
        values["label"] = torch.arange(n) % built["num_classes"]
    if built.get("cond_channels"):
        values["image"] = torch.randn(n, built["cond_channels"], size, size, generator=generator)
    if built.get("cond_dim"):
        values["vector"] = torch.randn(n, built["cond_dim"], generator=generator)
    if built.get("context_dim"):
        values["context"] = torch.randn(n, 4, built["context_dim"], generator=generator)
        values["context_mask"] = torch.ones(n, 4, dtype=torch.bool)
        values["context_mask"][0, -1] = False
    return Conditions(values)


def replaced(cond: Conditions, kind: str, row: int, seed: int = 9) -> Conditions:
    """cond with the `kind` value of one row replaced by other random numbers (another label)."""
    values = {name: value.clone() for name, value in cond.values.items()}
    if kind == "label":
        values["label"][row] = (values["label"][row] + 1) % 3
    else:
        generator = torch.Generator().manual_seed(seed)
        values[kind][row] = 10 * torch.randn(values[kind][row].shape, generator=generator)
    return Conditions(values, dropped=cond.dropped)


def digest(state: dict[str, torch.Tensor]) -> str:
    """One hash of a state dict: its names, dtypes, shapes and bytes, in order."""
    sha = hashlib.sha256()
    for name, tensor in state.items():
        sha.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        sha.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


@pytest.mark.parametrize(
    "built",
    [{"cond_channels": 2}, {"cond_dim": 5}, {"context_dim": 6}, ALL],
    ids=lambda b: "+".join(b),
)
@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (3, 3, 8, 16)])
def test_output_shapes_for_each_kind_and_all_together(built, shape):
    model = tiny(**built)
    n, _, h, w = shape
    cond = conditions(n, **built, size=h)
    if "image" in cond:  # at x's side, which need not be square
        cond = Conditions({**cond.values, "image": torch.randn(n, built["cond_channels"], h, w)})
    assert model(torch.randn(shape), torch.arange(n), cond).shape == shape
    assert model(torch.randn(shape), torch.arange(n), cond.null()).shape == shape


def test_a_default_network_is_the_same_bit_for_bit():
    # The digests of the state dicts (names, shapes, values at seed 0) that UNet gave before conditions
    # beyond labels: the new arguments, off, build nothing and draw no random number.
    assert digest(tiny().state_dict()) == ("76dddf4117053cbc5aba38f556f7b23a79ef7ad10c93696226431eb262525641")
    assert digest(tiny(num_classes=3).state_dict()) == (
        "e2bf7b84870ce19d2291b49948684d75a9ae1d922a4af6e4abbaaa4773413f44"
    )
    assert tiny().config["cond_channels"] is None and tiny().config["context_dim"] is None
    # A conditioned network only adds tensors (and widens conv_in by the image and its flag)
    plain, conditioned = tiny(num_classes=3).state_dict(), tiny(**ALL).state_dict()
    added = set(conditioned) - set(plain)
    assert set(plain) <= set(conditioned)
    assert {name.split(".")[0] for name in added} == {
        "vector_embedding",
        "context_tokens",
        "down_blocks",
        "mid_block",
        "up_blocks",
    }
    assert all(".cross_" in name for name in added if name.split(".")[0].endswith(("blocks", "block")))
    assert conditioned["conv_in.weight"].shape[1] == 3 + 2 + 1
    assert [n for n, t in plain.items() if t.shape != conditioned[n].shape] == ["conv_in.weight"]


def test_labels_as_a_tensor_and_as_conditions_give_the_same_output():
    model = perturb(tiny(num_classes=3))
    x, t = inputs()
    y = torch.tensor([2, 0])
    assert torch.equal(model(x, t, y), model(x, t, Conditions.from_labels(y)))
    # A dropped label is the null label
    null = torch.full((2,), model.null_class)
    assert torch.equal(model(x, t, null), model(x, t, Conditions.from_labels(y).null()))


@pytest.mark.parametrize("kind", ["label", "image", "vector", "context"])
def test_each_condition_changes_the_output_and_its_dropped_rows_get_the_null(kind):
    model = perturb(tiny(**ALL)).eval()
    x, t = inputs()
    cond = conditions(2, **ALL)
    out = model(x, t, cond)
    # The condition is read: another value in row 1 changes row 1, and only row 1
    other = model(x, t, replaced(cond, kind, row=1))
    assert not torch.allclose(other[1], out[1], atol=1e-4)
    assert torch.equal(other[0], out[0])
    # Row 1 dropped: its output is the same whatever its condition of that kind, and not the conditional one
    dropped = cond.drop({kind: torch.tensor([False, True])})
    out_dropped = model(x, t, dropped)
    assert torch.equal(out_dropped, model(x, t, replaced(dropped, kind, row=1)))
    assert torch.equal(out_dropped[0], out[0])
    assert not torch.allclose(out_dropped[1], out[1], atol=1e-4)


def test_a_dropped_image_is_not_an_image_of_zeros():
    # The flag channel tells the learned null from a real all-zero image (an empty mask)
    model = perturb(tiny(cond_channels=2)).eval()
    x, t = inputs()
    zeros = Conditions({"image": torch.zeros(2, 2, 8, 8)})
    assert not torch.allclose(model(x, t, zeros), model(x, t, zeros.null()), atol=1e-4)


def test_the_null_of_a_dropped_row_is_the_same_in_any_batch():
    # The unconditional output of a row depends on x and t alone: as guidance's second half, and alone
    model = perturb(tiny(**ALL)).eval()
    x, t = inputs()
    a, b = conditions(2, **ALL, seed=3).null(), conditions(2, **ALL, seed=4).null()
    assert torch.allclose(model(x, t, a), model(x, t, b), atol=1e-6)


def test_padded_tokens_are_not_read_and_an_all_padding_row_is_defined():
    model = perturb(tiny(context_dim=6)).eval()
    x, t = inputs()
    cond = conditions(2, context_dim=6)
    out = model(x, t, cond)
    padded = cond["context"].clone()
    padded[0, -1] = torch.tensor([1e4, float("inf"), float("nan"), -3.0, 0.0, 7.0])  # row 0's last: padding
    assert torch.equal(model(x, t, Conditions({**cond.values, "context": padded})), out)
    real = cond["context"].clone()
    real[0, 0] += 1.0  # a real token of row 0
    changed = model(x, t, Conditions({**cond.values, "context": real}))
    assert not torch.allclose(changed[0], out[0], atol=1e-4) and torch.equal(changed[1], out[1])
    # Without a mask every token is real: row 0's last token is read
    unmasked = {k: v for k, v in cond.values.items() if k != "context_mask"}
    assert not torch.allclose(model(x, t, Conditions(unmasked))[0], out[0], atol=1e-4)
    # A row of padding alone attends to the null token: finite, and the output of a dropped row
    empty = torch.zeros(2, 4, dtype=torch.bool)
    none = model(x, t, Conditions({**cond.values, "context_mask": empty}))
    assert torch.isfinite(none).all()
    assert torch.allclose(none, model(x, t, cond.null()), atol=1e-6)


def test_every_parameter_gets_a_gradient_with_some_rows_dropped():
    model = perturb(tiny(**ALL))
    x, t = inputs()
    cond = conditions(2, **ALL)
    dropped = cond.drop({kind: torch.tensor([False, True]) for kind in cond.kinds})
    model(x, t, dropped).square().mean().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert missing == []


def test_a_conditioned_network_round_trips_through_a_model_folder(tmp_path):
    model = perturb(tiny(**ALL)).eval()
    model.save_pretrained(tmp_path / "model")
    loaded = UNet.from_pretrained(tmp_path / "model").eval()
    assert {k: loaded.config[k] for k in ALL} == ALL
    x, t = inputs()
    cond = conditions(2, **ALL)
    assert torch.equal(loaded(x, t, cond), model(x, t, cond))


def test_forward_with_every_condition_reads_no_value_from_the_device(monkeypatch):
    model = tiny(**ALL)
    x, t = inputs()
    cond = conditions(2, **ALL).drop({"label": torch.tensor([True, False])})

    def sync(*args):
        raise AssertionError("forward read a tensor value on the host")

    for name in ("__bool__", "item", "__int__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    assert model(x, t, cond).shape == x.shape


def without(cond: Conditions, *names: str) -> Conditions:
    return Conditions({k: v for k, v in cond.values.items() if k not in names})


def with_value(cond: Conditions, name: str, value: torch.Tensor) -> Conditions:
    return Conditions({**cond.values, name: value})


COND = conditions(2, **ALL)


@pytest.mark.parametrize(
    ("built", "cond", "message"),
    [
        (
            ALL,
            without(COND, "image"),
            r"built for image conditions \(cond_channels=2\): pass Conditions holding",
        ),
        (ALL, without(COND, "vector"), r"built for vector conditions \(cond_dim=5\).*cond\.null\(\)"),
        (ALL, without(COND, "context", "context_mask"), r"'context' of shape \(2, L, 6\)"),
        (ALL, without(COND, "label"), "class-conditional.*pass y"),
        (
            ALL,
            with_value(COND, "image", torch.zeros(2, 3, 8, 8)),
            r"image condition must be a float tensor of shape \(2, 2, 8, 8\), got torch.float32 of shape "
            r"\(2, 3, 8, 8\)",
        ),
        (ALL, with_value(COND, "image", torch.zeros(2, 2, 4, 4)), r"shape \(2, 2, 8, 8\)"),
        (ALL, with_value(COND, "vector", torch.zeros(2, 4)), r"vector condition .* shape \(2, 5\)"),
        (ALL, with_value(COND, "vector", torch.zeros(2, 5, dtype=torch.long)), "must be a float tensor"),
        (ALL, with_value(COND, "context", torch.zeros(2, 4, 5)), r"shape \(2, L, 6\), got .* \(2, 4, 5\)"),
        (
            ALL,
            with_value(COND, "context_mask", torch.ones(2, 3, dtype=torch.bool)),
            r"context_mask must be a bool tensor of shape \(N, L\) = \(2, 4\)",
        ),
        (ALL, with_value(COND, "context_mask", torch.ones(2, 4)), "context_mask must be a bool tensor"),
        (ALL, COND.rows([0]), r"shape \(2,\)"),  # one row of conditions for two images
        (
            {},
            Conditions({"image": torch.zeros(2, 2, 8, 8)}),
            r"takes no image condition \(cond_channels=None",
        ),
        ({"cond_channels": 2}, without(COND, "image"), "no class embedding"),
        ({"cond_dim": 5}, without(COND, "label", "image"), r"takes no context condition \(context_dim=None"),
        (
            {"num_classes": 3, "null_label": False},
            Conditions.from_labels(torch.tensor([0, 1])).null(),
            r"no null label \(null_label=False\): its labels cannot be dropped",
        ),
    ],
)
def test_conditions_that_do_not_fit_the_network_are_refused(built, cond, message):
    x, t = inputs()
    with pytest.raises(ValueError, match=message):
        tiny(**built)(x, t, cond)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"cond_channels": 0}, r"cond_channels must be a positive int or None .*got 0"),
        ({"cond_dim": 2.5}, r"cond_dim must be a positive int or None .*got 2.5"),
        ({"context_dim": True}, r"context_dim must be a positive int"),
        ({"cond_dim": 4, "time_conditioning": False}, "cond_dim needs time_conditioning=True"),
        (
            {"context_dim": 4, "attention_resolutions": (), "mid_attention": False},
            "context_dim needs attention blocks",
        ),
    ],
)
def test_constructor_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        UNet(**{**TINY, **overrides})


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (["model.cond_channels=-1"], r"model\.cond_channels: cond_channels must be a positive int"),
        (
            ["model.context_dim=8", "model.attention_resolutions=[]", "model.mid_attention=false"],
            r"model\.context_dim.*: context_dim needs attention blocks",
        ),
        # Unless files give such conditions, training could not feed them
        (
            ["model.cond_dim=3"],
            r"^model\.cond_dim=3 conditions the network on a vector, but the data give none: set "
            r"model\.cond_dim=null, or data\.task=attributes, or read one per image from files "
            r"\(data\.conditions=\{vector: NAME\}\)$",
        ),
    ],
)
def test_a_config_with_bad_condition_settings_is_refused_when_read(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(DIGITS_YAML, overrides)


# --- conditions through the loss, the denoiser, guidance and the samplers ----------------------------------

# x0-prediction: a random network's error is not amplified by 1 / sqrt(alpha_bar) near t = T
SCHEDULER = NoiseScheduler(num_train_timesteps=100, beta_schedule="cosine", prediction_type="sample")
KINDS_BUILT = [{"cond_channels": 2}, {"cond_dim": 5}, {"context_dim": 6}, ALL]


def prediction(model: UNet, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
    """x0 from one plain model call (no guidance), as the denoiser converts it."""
    x0, _ = SCHEDULER.predict_x0_and_eps(model(x, t.repeat(x.shape[0]), cond), x, t.repeat(x.shape[0]))
    return x0


@pytest.mark.parametrize("built", KINDS_BUILT, ids=lambda b: "+".join(b))
def test_guidance_combines_the_conditional_and_the_null_predictions(built):
    model = perturb(tiny(**built)).eval()
    x, _ = inputs()
    t = torch.tensor(40)
    cond = conditions(2, **built)
    conditional, unconditional = prediction(model, x, t, cond), prediction(model, x, t, cond.null())
    assert not torch.allclose(conditional, unconditional, atol=1e-3)  # the conditions matter

    def guided(scale: float) -> torch.Tensor:
        return denoiser(model, SCHEDULER, cond=cond, guidance_scale=scale)(x, t).x0

    assert torch.equal(guided(1.0), conditional)
    # One batched call on [cond, cond.null()]: scale 0 is the second half, and the rows stay in order
    assert torch.allclose(guided(0.0), unconditional, atol=1e-5)
    assert torch.allclose(guided(3.0), unconditional + 3 * (conditional - unconditional), atol=1e-4)


@pytest.mark.parametrize("built", KINDS_BUILT, ids=lambda b: "+".join(b))
def test_rescaled_guidance_brings_each_image_s_std_to_the_conditional_one_s(built):
    # Lin et al. 2023, Eq. 15-16 on the network's prediction, here eps
    scheduler = NoiseScheduler(num_train_timesteps=100, beta_schedule="cosine", prediction_type="epsilon")
    model = perturb(tiny(**built)).eval()
    x, _ = inputs()
    t = torch.tensor(40)
    cond = conditions(2, **built)

    def eps(scale: float, phi: float = 0.0) -> torch.Tensor:
        return denoiser(model, scheduler, cond=cond, guidance_scale=scale, guidance_rescale=phi)(x, t).eps

    conditional, guided = eps(1.0), eps(3.0)
    std = lambda e: e.flatten(1).std(dim=1)  # noqa: E731 (per image)
    assert not torch.allclose(std(guided), std(conditional), rtol=1e-2)  # guidance changes the std
    assert torch.equal(eps(3.0, 0.0), guided)  # phi = 0: plain guidance
    rescaled = eps(3.0, 1.0)
    torch.testing.assert_close(std(rescaled), std(conditional), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rescaled, guided * (std(conditional) / std(guided)).view(-1, 1, 1, 1))
    half = guided * (0.5 * std(conditional) / std(guided) + 0.5).view(-1, 1, 1, 1)  # Eq. 16 at phi = 0.5
    torch.testing.assert_close(eps(3.0, 0.5), half)


def test_the_guided_call_batches_each_kind_with_its_null_and_labels_as_a_tensor():
    seen = []

    def record(x, t, y=None):
        seen.append(y)
        return torch.zeros_like(x)

    x, _ = inputs()
    cond = conditions(2, **ALL)
    model_denoiser(record, SCHEDULER, x, cond=cond, guidance_scale=2.0, null_class=3)(x, torch.tensor(5))
    given = seen[-1]
    assert given.batch_size == 4 and given["label"].tolist() == [0, 1, 3, 3]  # the null label, not a drop
    assert "label" not in given.dropped
    for kind in ("image", "vector", "context"):
        assert given.is_dropped(kind).tolist() == [False, False, True, True], kind
        assert torch.equal(given[kind], torch.cat([cond[kind], cond[kind]]))
    # Labels alone reach the network as a label tensor, as before conditions beyond labels
    y = torch.tensor([1, 2])
    model_denoiser(record, SCHEDULER, x, y=y, guidance_scale=2.0, null_class=3)(x, torch.tensor(5))
    assert torch.equal(seen[-1], torch.tensor([1, 2, 3, 3]))
    model_denoiser(record, SCHEDULER, x, cond=Conditions.from_labels(y))(x, torch.tensor(5))
    assert torch.equal(seen[-1], y)
    model_denoiser(record, SCHEDULER, x)(x, torch.tensor(5))
    assert seen[-1] is None


@pytest.mark.parametrize(
    ("built", "sampler"),
    [(built, "ddim") for built in KINDS_BUILT[:-1]] + [(ALL, name) for name in ("ddim", "dpm++2m", "heun")],
    ids=lambda v: "+".join(v) if isinstance(v, dict) else v,
)
def test_a_sampler_runs_end_to_end_with_each_condition(built, sampler):
    model = perturb(tiny(**built)).eval()
    cond = conditions(2, **built)

    def run(c, scale: float = 2.0) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        return sample(
            model,
            SCHEDULER,
            (2, 3, 8, 8),
            cond=c,
            sampler=sampler,
            steps=3,
            guidance_scale=scale,
            generator=generator,
            progress=False,
        )

    images = run(cond)
    assert images.shape == (2, 3, 8, 8) and torch.isfinite(images).all()
    assert torch.equal(run(cond), images)  # seeded
    assert not torch.allclose(run(conditions(2, **built, seed=7)), images, atol=1e-3)  # conditions read
    # Guidance at scale 0 samples the unconditional model: the conditions given all dropped
    assert torch.allclose(run(cond, 0.0), run(cond.null(), 1.0), rtol=1e-4, atol=1e-4)


def test_labels_sample_the_same_as_y_and_as_conditions():
    model = perturb(tiny(num_classes=3)).eval()
    y = torch.tensor([2, 0])

    def run(**given) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        return sample(
            model, SCHEDULER, (2, 3, 8, 8), steps=3, guidance_scale=2.0, generator=generator, progress=False,
            **given,
        )  # fmt: skip

    assert torch.equal(run(y=y), run(cond=Conditions.from_labels(y)))


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (dict(y=torch.tensor([0, 1]), cond=COND), "pass the conditions once"),
        (dict(cond=COND.rows([0, 1, 0])), "the conditions hold 3 rows for 2 images"),
        (dict(cond=None, guidance_scale=2.0), "needs class labels y or conditions cond"),
        (dict(cond=COND, null_class=7, guidance_scale=2.0), r"labels must lie in .*got \[7\]"),
        (dict(cond=with_value(COND, "label", torch.tensor([0, 5]))), r"labels must lie in .*got \[5\]"),
        (dict(cond=torch.tensor([0, 1])), "cond must be a ddpm.conditions.Conditions"),
    ],
)
def test_the_denoiser_refuses_conditions_that_do_not_fit(given, message):
    x, _ = inputs()
    with pytest.raises((ValueError, TypeError), match=message):
        model_denoiser(tiny(**ALL), SCHEDULER, x, **given)


def test_a_dropped_label_without_a_null_label_is_refused_before_any_call():
    model = tiny(num_classes=3, null_label=False, cond_dim=5)
    x, _ = inputs()
    cond = Conditions({"label": torch.tensor([0, 1]), "vector": torch.zeros(2, 5)})
    with pytest.raises(ValueError, match="a dropped label needs a null label.*drop no label"):
        model_denoiser(model, SCHEDULER, x, cond=cond.drop({"label": torch.tensor([True, False])}))
    with pytest.raises(ValueError, match="guidance_scale=2.0 needs a null label"):
        model_denoiser(model, SCHEDULER, x, cond=cond, guidance_scale=2.0)
    # Guidance on the other kinds alone needs no null label
    model_denoiser(tiny(cond_dim=5), SCHEDULER, x, cond=without(cond, "label"), guidance_scale=2.0)


def test_the_loss_hands_the_conditions_to_the_model_and_labels_give_the_same_loss():
    model = perturb(tiny(num_classes=3))
    x0, _ = inputs()
    noise, t = torch.randn_like(x0), torch.tensor([10, 60])
    y = torch.tensor([1, 2])
    by_tensor = diffusion_losses(model, SCHEDULER, x0, noise, t, y)
    assert torch.equal(by_tensor, diffusion_losses(model, SCHEDULER, x0, noise, t, Conditions.from_labels(y)))
    seen = []
    cond = conditions(2, **ALL)
    diffusion_losses(lambda x, t, c: seen.append(c) or torch.zeros_like(x), SCHEDULER, x0, noise, t, cond)
    assert seen == [cond]


def test_the_loss_of_a_conditioned_network_trains_every_null():
    model = perturb(tiny(**ALL))
    x0, _ = inputs()
    cond = conditions(2, **ALL)
    cond = cond.drop({kind: torch.tensor([True, False]) for kind in cond.kinds})
    noise, t = torch.randn_like(x0), torch.tensor([30, 60])
    losses = diffusion_losses(model, SCHEDULER, x0, noise, t, cond)
    losses.mean().backward()
    assert losses.shape == (2,) and torch.isfinite(losses).all()
    assert model.vector_embedding.null.grad.abs().sum() > 0 and model.context_tokens.null.grad.abs().sum() > 0
    assert model.class_embedding.weight.grad[model.null_class].abs().sum() > 0


def test_condition_dropout_joint_and_per_kind():
    cond = conditions(4000, **ALL)
    torch.manual_seed(0)
    joint = drop_conditions(cond, 0.3)
    # One draw per row, the draws of drop_labels: every kind of a row dropped together
    torch.manual_seed(0)
    labels = drop_labels(cond["label"], 0.3, null_class=3)
    assert all(torch.equal(joint.is_dropped(kind), labels == 3) for kind in cond.kinds)
    assert abs(joint.is_dropped("image").float().mean() - 0.3) < 0.03
    per_kind = drop_conditions(cond, {"label": 0.0, "image": 1.0, "vector": 0.5, "context": 0.2})
    rates = {kind: per_kind.is_dropped(kind).float().mean().item() for kind in cond.kinds}
    assert rates["label"] == 0 and rates["image"] == 1
    assert abs(rates["vector"] - 0.5) < 0.03 and abs(rates["context"] - 0.2) < 0.03
    together = (per_kind.is_dropped("vector") & per_kind.is_dropped("context")).float().mean()
    assert abs(together - 0.1) < 0.02  # independent
    assert drop_conditions(Conditions(), 0.5).kinds == ()
    # Dropping adds to what is dropped already
    assert drop_conditions(cond.null(), 0.0).is_dropped("vector").all()


@pytest.mark.parametrize(
    ("p", "message"),
    [
        (
            {"image": 0.1},
            r"names \['image'\] but the conditions hold \['label', 'image', 'vector', 'context'\]",
        ),
        (1.5, r"probability of all must lie in \[0, 1\], got 1.5"),
        ({"label": 0, "image": -0.1, "vector": 0, "context": 0}, "probability of image must lie in"),
    ],
)
def test_condition_dropout_errors(p, message):
    with pytest.raises(ValueError, match=message):
        drop_conditions(COND, p)


def test_the_classic_unet_takes_labels_as_conditions_and_refuses_the_other_kinds():
    torch.manual_seed(0)
    model = perturb(ClassicUNet(base_channels=4, channel_mult=[1, 2], time_conditioning=True, num_classes=3))
    x, t = inputs()
    y = torch.tensor([2, 0])
    assert torch.equal(model(x, t, y), model(x, t, Conditions.from_labels(y)))
    null = torch.full((2,), model.null_class)
    assert torch.equal(model(x, t, null), model(x, t, Conditions.from_labels(y).null()))
    with pytest.raises(ValueError, match=r"ClassicUNet takes no vector condition \(cond_dim=None\)"):
        model(x, t, Conditions({"label": y, "vector": torch.zeros(2, 5)}))


@pytest.mark.parametrize("name", ["cond_dim", "context_dim"])  # cond_channels exports: tests/test_export.py
def test_a_vector_or_sequence_conditioned_network_is_refused_by_the_diffusers_export_by_name(name):
    with pytest.raises(ValueError, match=rf"model\.{name}=2 cannot be exported to diffusers"):
        diffusers_unet_config(tiny(**{name: 2}).config)
