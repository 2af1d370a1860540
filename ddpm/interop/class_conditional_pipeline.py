"""`ClassConditionalPipeline`: diffusers' DDPMPipeline with class labels and classifier-free guidance, for a
class-conditional UNet2DModel (diffusers' DDPMPipeline calls its UNet without labels, which such a UNet
refuses).

`python -m ddpm.export` copies this file as it is into the folder of every class-conditional model it exports
and names the class in model_index.json, so the folder needs diffusers alone, not ddpm:

    pipeline = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    images = pipeline(class_labels=[3, 7], guidance_scale=2.0, num_inference_steps=20).images

(diffusers runs code that a folder brings only with trust_remote_code=True; without it `from_pretrained` says
so.) Hence this module imports nothing of ddpm.
"""

import inspect

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, SchedulerMixin, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor

# The UNet config key under which ddpm's export records the null label (its last class embedding row, "no
# label"); ddpm.interop.diffusers.NULL_CLASS_KEY, spelled again here because this file must not import ddpm.
NULL_CLASS_KEY = "_ddpm_null_class"


class ClassConditionalPipeline(DiffusionPipeline):
    """Samples a class-conditional UNet2DModel with any diffusers scheduler, in the loop of diffusers'
    pipelines (x_T times init_noise_sigma; scale_model_input, the UNet, step for each timestep).

    unet: a UNet2DModel with num_class_embeds; its config's NULL_CLASS_KEY, when present, is the null label
    used for unconditional images and for guidance. scheduler: any diffusers scheduler.
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler: SchedulerMixin):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @property
    def null_class(self) -> int | None:
        """The null label ("no label") of the UNet, or None when it has none."""
        return self.unet.config.get(NULL_CLASS_KEY)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | list[int] | torch.Tensor | None = None,
        batch_size: int | None = None,
        guidance_scale: float = 1.0,
        num_inference_steps: int = 1000,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Draw one image per label.

        class_labels: a label (batch_size images of it, 1 by default), a list or (N,) tensor of labels (one
            image each; batch_size, if given, must be N), or None: batch_size unconditional images (the null
            label). Labels lie in 0 .. num_class_embeds - 1, the null label among them.
        guidance_scale: classifier-free guidance weight s >= 0 (Ho & Salimans 2022): the prediction is
            uncond + s * (cond - uncond), from one UNet call on [x, x] with labels [y, null]; a learned
            variance (the UNet's second half of channels) is the conditional one. 1: the conditional UNet
            alone, one call per step. s != 1 needs the null label.
        num_inference_steps, generator, output_type ("pil", "np" or "pt"), return_dict: as DDPMPipeline's.
        Returns ImagePipelineOutput(images), images in [0, 1] (or the tuple (images,)).
        """
        labels = self._labels(class_labels, batch_size)
        null = self.null_class
        if guidance_scale != 1.0 and null is None:
            raise ValueError(
                f"guidance_scale={guidance_scale} needs a null label, and this UNet's config has no "
                f"{NULL_CLASS_KEY}; use guidance_scale=1.0"
            )
        config = self.unet.config
        size = config.sample_size
        shape = (len(labels), config.in_channels, *((size, size) if isinstance(size, int) else size))
        device = self._execution_device
        image = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        image = image * self.scheduler.init_noise_sigma
        labels = labels.to(device)
        if guidance_scale != 1.0:
            labels = torch.cat([labels, torch.full_like(labels, null)])
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        if hasattr(self.scheduler, "set_begin_index"):
            # a multistep scheduler whose first timesteps repeat (diffusers #12771) would otherwise start at
            # its second and run past its end
            self.scheduler.set_begin_index(0)
        takes = inspect.signature(self.scheduler.step).parameters
        extra = {"generator": generator} if "generator" in takes else {}
        if "use_clipped_model_output" in takes:  # DDIM: eps from the clamped x0 (GLIDE's way), as ddpm does
            extra["use_clipped_model_output"] = True
        for t in self.progress_bar(self.scheduler.timesteps):
            x = self.scheduler.scale_model_input(image, t)
            if guidance_scale == 1.0:
                output = self.unet(x, t, class_labels=labels).sample
            else:  # (2N, C', H, W): conditional first; guide the prediction channels only
                cond, uncond = self.unet(torch.cat([x, x]), t, class_labels=labels).sample.chunk(2)
                channels = image.shape[1]
                guided = uncond[:, :channels] + guidance_scale * (cond[:, :channels] - uncond[:, :channels])
                output = torch.cat([guided, cond[:, channels:]], dim=1)
            image = self.scheduler.step(output, t, image, **extra).prev_sample

        image = (image / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=image) if return_dict else (image,)

    def _labels(self, class_labels, batch_size: int | None) -> torch.Tensor:
        """class_labels as an (N,) long tensor (see __call__), checked against num_class_embeds."""
        classes = self.unet.config.num_class_embeds
        if not classes:
            raise ValueError(
                "the UNet has no class embedding (num_class_embeds); sample it with DDPMPipeline"
            )
        if class_labels is None:
            if self.null_class is None:
                raise ValueError(
                    f"class_labels are needed: this UNet has no null label ({NULL_CLASS_KEY}) to draw "
                    f"unconditional images; pass labels in 0..{classes - 1}"
                )
            class_labels = self.null_class
        labels = torch.as_tensor(class_labels, dtype=torch.long)
        if labels.ndim == 0:
            labels = labels.repeat(batch_size or 1)
        elif labels.ndim != 1 or batch_size not in (None, len(labels)):
            raise ValueError(
                f"class_labels must be a label or a list of labels (one image each), got shape "
                f"{tuple(labels.shape)} with batch_size={batch_size}"
            )
        outside = (labels < 0) | (labels >= classes)
        if bool(outside.any()):
            null = f" ({self.null_class}: no label)" if self.null_class is not None else ""
            raise ValueError(
                f"class_labels must lie in 0..{classes - 1}{null}, got {labels[outside].unique().tolist()}"
            )
        return labels
