"""diffusion beyond the UNet: DiT / SD3 transformers, diffusers-format LoRA, DreamBooth prior
preservation, a clip run's text tower and an image_classification / clip run as FID features,
and sampling on rank zero only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from modalforge.config import compose
from modalforge.run import run
from modalforge.testing import assert_plugin_conforms

from cli_helpers import FAST

pytest.importorskip("diffusers")

QUICK = ["data.batch_size=8", "optim.warmup_steps=0", "objective.evaluation.sample_steps=2", "objective.evaluation.samples_per_class=2",
         "objective.evaluation.fid_real_images=16"]
# a 2-layer transformer keeps each run to a few seconds
TINY_T = ["model.transformer.num_layers=2", "model.transformer.num_attention_heads=2",
          "model.transformer.attention_head_dim=16"]


# ---- transformer denoisers -------------------------------------------------------------------
def test_dit_from_config_learns_and_names_its_blocks(tmp_path):
    from diffusers.models.attention import BasicTransformerBlock

    report = assert_plugin_conforms("diffusion", tmp_path, [*QUICK, "model=diffusion/dit_tiny", *TINY_T,
                                                            "optim.lr=1e-3", "objective.ema.decay=null"], steps=8)
    assert any("emb.class_embedder" in n for n in report.changed)  # the class embedding learns
    from modalforge.plugins.vision.diffusion.denoisers import block_classes_for

    assert block_classes_for({"denoiser": "dit"}) == {BasicTransformerBlock}


def test_sd3_from_config_learns_with_flow_and_pooled_text(tmp_path):
    from diffusers.models.attention import JointTransformerBlock

    report = assert_plugin_conforms("diffusion", tmp_path, [*QUICK, "model=diffusion/sd3_tiny", *TINY_T,
                                                            "objective.conditioning.kind=text", "objective.schedule.prediction_type=flow",
                                                            "objective.ema.decay=null", "optim.lr=1e-3"], steps=8)
    assert any("time_text_embed.text_embedder" in n for n in report.changed)  # the pooled projection learns
    assert any("context_embedder" in n for n in report.changed)  # the token states' projection learns
    from modalforge.plugins.vision.diffusion.denoisers import block_classes_for

    assert block_classes_for({"denoiser": "sd3"}) == {JointTransformerBlock}


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8, 16],
                         layers_per_block=1, norm_num_groups=8, down_block_types=["DownEncoderBlock2D"] * 2,
                         up_block_types=["UpDecoderBlock2D"] * 2, shift_factor=0.0)


def _tiny_tokenizer(tmp_path: Path):
    from modalforge.data.tokenizers import cached_bpe

    tokenizer = cached_bpe(["a red circle", "a blue square on the left", "a small green ring"], 300,
                           cache_dir=tmp_path / "tok")
    tokenizer.model_max_length = 16
    return tokenizer


def _tiny_clip(tokenizer, hidden: int, projection: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tokenizer), max_position_embeddings=16, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=2, num_attention_heads=2, projection_dim=projection, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))


def _pretrained_run(tmp_path: Path, folder: Path, *extra: str):
    if not any(e.startswith("objective.schedule.prediction_type=") for e in extra):  # the demo's flow default; DDPM pipelines
        extra = ("objective.schedule.prediction_type=epsilon", "objective.schedule.timestep_sampling=uniform", *extra)
    cfg = compose(["plugin=diffusion", *FAST, *QUICK, "model=diffusion/pretrained", f"model.name_or_path={folder}",
                   "objective.evaluation.samples_per_class=0", "objective.ema.decay=null", "trainer.max_steps=3",
                   "trainer.limit_val_batches=0", "callbacks=none", *extra])
    return run(cfg, tmp_path / "run")


def test_dit_pipeline_folder_trains_and_exports_a_dit_pipeline(tmp_path):
    from diffusers import DDPMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    # learn_sigma as the released DiT: 2x latent channels out; 10 classes, more than the data's 6
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                num_layers=2, sample_size=16, patch_size=2, num_embeds_ada_norm=10)
    DiTPipeline(transformer=dit, vae=_tiny_vae(), scheduler=DDPMScheduler()).save_pretrained(str(tmp_path / "dit"))
    before = {k: v.clone() for k, v in dit.state_dict().items()}
    trainer, module, _ = _pretrained_run(tmp_path, tmp_path / "dit")
    objective = module.objective
    assert type(objective.denoiser).__name__ == "DiTTransformer2DModel" and objective.vae is not None
    assert objective.block_classes() and next(iter(objective.block_classes())).__name__ == "BasicTransformerBlock"
    # the data's null class (6) is mapped onto DiT's own null embedding (10)
    assert objective._labels(torch.tensor([0, 6])).tolist() == [0, 10]
    after = objective.denoiser.state_dict()
    assert any(not torch.equal(before[k], after[k].cpu()) for k in before)
    pipe = DiTPipeline.from_pretrained(str(tmp_path / "run" / "final"))
    # guidance_scale=1: DiTPipeline hard-codes the null class 1000 (the released ImageNet DiT) for guidance
    image = pipe(class_labels=[1], guidance_scale=1.0, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 output_type="np").images
    assert image.shape == (1, 32, 32, 3)


def test_sd3_pipeline_folder_trains_through_its_prompt_encoder(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    tokenizer = _tiny_tokenizer(tmp_path)
    # two CLIPs (hidden 32 + 32 -> joint 64; projections 16 + 16 -> pooled 32), no T5, as SD3 without text_encoder_3
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64,
                                        caption_projection_dim=32, pooled_projection_dim=32, pos_embed_max_size=16)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                                    vae=_tiny_vae(), text_encoder=_tiny_clip(tokenizer, 32, 16), tokenizer=tokenizer,
                                    text_encoder_2=_tiny_clip(tokenizer, 32, 16), tokenizer_2=tokenizer,
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(str(tmp_path / "sd3"))
    trainer, module, _ = _pretrained_run(tmp_path, tmp_path / "sd3", "objective.conditioning.kind=text",
                                         "objective.schedule.prediction_type=flow", "objective.schedule.timestep_sampling=logit_normal")
    objective = module.objective
    assert type(objective.text_encoder).__name__ == "PipelinePromptEncoder"
    assert not any(p.requires_grad for p in objective.text_encoder.parameters())
    states, pooled = objective.text_encoder(["a red circle"])
    assert states.shape[-1] == 64 and pooled.shape == (1, 32)
    # plain diffusers, loading an SD3 pipeline without its T5 as diffusers documents it
    final = StableDiffusion3Pipeline.from_pretrained(str(tmp_path / "run" / "final"), text_encoder_3=None,
                                                     tokenizer_3=None)
    out = final(
        "a red circle", num_inference_steps=2, height=32, width=32, output_type="np",
        generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 32, 32, 3)


def _tiny_sd_pipeline(tmp_path: Path) -> Path:
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tokenizer = _tiny_tokenizer(tmp_path)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=16, hidden_size=32,
                                        intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                        pad_token_id=tokenizer.pad_token_id))
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=[16, 32],
                                layers_per_block=1, norm_num_groups=8, cross_attention_dim=32, attention_head_dim=8,
                                down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                                up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"])
    pipe = StableDiffusionPipeline(vae=_tiny_vae(), text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(tmp_path / "sd"))
    return tmp_path / "sd"


# ---- LoRA in load_lora_weights format ------------------------------------------------------
def test_lora_export_loads_with_plain_diffusers_load_lora_weights(tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    base_dir = _tiny_sd_pipeline(tmp_path)
    _pretrained_run(tmp_path, base_dir, "adapter=lora", "objective.conditioning.kind=text", "optim.lr=1e-2",
                    "objective.ema.decay=0.5")
    final = tmp_path / "run" / "final"
    assert (final / "adapter_config.json").exists()  # the PEFT adapter, as every plugin writes it
    keys = load_file(str(final / "pytorch_lora_weights.safetensors")).keys()
    assert keys and all(k.startswith("unet.") and ("lora.down" in k or "lora.up" in k) for k in keys)

    def image(pipe):
        return pipe("a red circle", num_inference_steps=2, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    pipe = StableDiffusionPipeline.from_pretrained(str(base_dir))
    base = image(pipe)
    pipe.load_lora_weights(str(final))  # plain diffusers, as for any DreamBooth LoRA
    config = next(iter(pipe.unet.peft_config.values()))
    assert (config.r, config.lora_alpha) == (8, 16)  # the metadata keeps alpha (scale alpha / r = 2)
    tuned = image(pipe)
    assert base.shape == tuned.shape == (1, 32, 32, 3)
    assert abs(base - tuned).max() > 1e-3
    # and it is the LoRA that was trained: the same UNet output as the PEFT adapter of final/
    from diffusers import UNet2DConditionModel
    from peft import PeftModel

    peft_unet = PeftModel.from_pretrained(UNet2DConditionModel.from_pretrained(str(base_dir / "unet")), str(final))
    x, t, states = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 16, 32)
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, t, encoder_hidden_states=states).sample,
                                   peft_unet(x, t, encoder_hidden_states=states).sample, rtol=1e-4, atol=1e-5)



def test_sd3_lora_export_loads_into_a_plain_sd3_transformer(tmp_path):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from peft import LoraConfig, get_peft_model

    from modalforge.plugins.vision.diffusion.lora_export import save_diffusers_lora
    from modalforge.plugins.vision.diffusion.objective import ATTENTION_TARGETS

    def transformer():
        torch.manual_seed(0)
        return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                     attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                     caption_projection_dim=16, pooled_projection_dim=8, pos_embed_max_size=8)

    peft = get_peft_model(transformer(), LoraConfig(r=4, lora_alpha=8, target_modules=ATTENTION_TARGETS))
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)  # as if trained
    assert save_diffusers_lora(peft, tmp_path).name == "pytorch_lora_weights.safetensors"
    plain = transformer()
    state, metadata = StableDiffusion3Pipeline.lora_state_dict(str(tmp_path), return_lora_metadata=True)
    StableDiffusion3Pipeline.load_lora_into_transformer(state, plain, metadata=metadata)  # as load_lora_weights
    inputs = {"hidden_states": torch.randn(1, 4, 8, 8), "encoder_hidden_states": torch.randn(1, 3, 16),
              "pooled_projections": torch.randn(1, 8), "timestep": torch.tensor([500.0])}
    plain.eval(), peft.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(**inputs).sample, peft(**inputs).sample, rtol=1e-4, atol=1e-5)


# ---- DreamBooth prior preservation ---------------------------------------------------------
def test_prior_loss_is_train_dreambooth_formula():
    import torch.nn.functional as F

    from modalforge.plugins.vision.diffusion import losses

    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(6, 3, 4, 4, generator=g), torch.randn(6, 3, 4, 4, generator=g)
    snr_weights = torch.tensor([0.2, 1.0, 0.7, 1.0, 1.0, 1.0])  # instance examples weighted, as with --snr_gamma
    mse = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
    loss, instance, prior = losses.prior_preservation_loss(mse * snr_weights, mse, 3, 0.5)
    # diffusers/examples/dreambooth/train_dreambooth.py, with_prior_preservation
    model_pred, model_pred_prior = torch.chunk(pred, 2, dim=0)
    target_i, target_prior = torch.chunk(target, 2, dim=0)
    script = F.mse_loss(model_pred.float(), target_i.float(), reduction="none").mean(dim=(1, 2, 3)) * snr_weights[:3]
    script_prior = F.mse_loss(model_pred_prior.float(), target_prior.float(), reduction="mean")
    torch.testing.assert_close(prior, script_prior)
    torch.testing.assert_close(loss, script.mean() + 0.5 * script_prior)
    # without weighting the instance term is the script's plain F.mse_loss(..., reduction="mean")
    plain, _, _ = losses.prior_preservation_loss(mse, mse, 3, 1.0)
    torch.testing.assert_close(plain, F.mse_loss(model_pred, target_i) + F.mse_loss(model_pred_prior, target_prior))


def test_given_class_images_are_not_regenerated(tmp_path):
    from modalforge.plugins.vision.diffusion.prior import ClassImages, ensure_class_images

    made = ensure_class_images(tmp_path / "class", 3, lambda n: torch.rand(n, 3, 8, 8))
    assert [p.name for p in made] == ["class_00000.png", "class_00001.png", "class_00002.png"]

    def refuse(n):
        raise AssertionError("given class images must be used as they are")

    assert ensure_class_images(tmp_path / "class", 2, refuse) == made[:2]
    images = ClassImages(made, 16)
    first, second = images.take(2), images.take(2)  # in turn, wrapping around
    assert first.shape == (2, 3, 16, 16) and torch.equal(second[1], first[0])
    from modalforge.errors import ModalforgeError
    from modalforge.plugins.vision.diffusion.objective import DiffusionObjective

    with pytest.raises(ModalforgeError, match="needs objective.prior.class_prompt"):
        DiffusionObjective(conditioning={"kind": "text"}, prior={"loss_weight": 1.0, "class_data_dir": str(tmp_path)})
    with pytest.raises(ModalforgeError, match="needs objective.conditioning.kind=text"):
        DiffusionObjective(conditioning={"kind": "class"},
                           prior={"loss_weight": 1.0, "class_prompt": "a shape", "class_data_dir": str(tmp_path)})


def test_dreambooth_run_generates_class_images_and_logs_the_prior_loss(tmp_path):
    from cli_helpers import series

    base_dir = _tiny_sd_pipeline(tmp_path)
    trainer, module, _ = _pretrained_run(
        tmp_path, base_dir, "adapter=lora", "objective.conditioning.kind=text", "objective.prior.loss_weight=1.0",
        "objective.prior.class_prompt='a shape'", f"objective.prior.class_data_dir={tmp_path / 'class'}",
        "objective.prior.num_class_images=3", "objective.evaluation.sample_steps=2")
    assert len(list((tmp_path / "class").glob("*.png"))) == 3
    prior = series(tmp_path / "run", "train/prior_loss")
    assert prior and all(v > 0 for v in prior.values())
    assert series(tmp_path / "run", "train/instance_loss")


# ---- other runs' final/ as frozen helpers ---------------------------------------------------
@pytest.fixture(scope="module")
def clip_final(tmp_path_factory) -> Path:
    """A clip run's final/ after a few steps of the clip plugin's tiny default (context length 16)."""
    folder = tmp_path_factory.mktemp("clip")
    run(compose(["plugin=clip", *FAST, "data.batch_size=16", "optim.warmup_steps=0", "trainer.max_steps=3",
                 "trainer.limit_val_batches=0", "callbacks=none"]), folder)
    return folder / "final"


@pytest.fixture(scope="module")
def classifier_final(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("classifier")
    run(compose(["plugin=image_classification", *FAST, "data.batch_size=16", "optim.warmup_steps=0",
                 "data.augment=none", "trainer.max_steps=2", "trainer.limit_val_batches=0", "callbacks=none"]), folder)
    return folder / "final"


def test_clip_text_tower_as_the_text_encoder_and_clip_fid_features(tmp_path, clip_final):
    from cli_helpers import series
    from modalforge.plugins.vision.diffusion.clip_towers import OpenClipTokenizer, OpenClipTextTower, load_clip_run

    cfg = compose(["plugin=diffusion", *FAST, *QUICK, "objective.conditioning.kind=text", "objective.ema.decay=null",
                   f"model.text_encoder.name_or_path={clip_final}", f"objective.evaluation.fid_features={clip_final}",
                   "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
                   "callbacks=none"])
    trainer, module, dm = run(cfg, tmp_path / "run")
    tower = module.objective.text_encoder
    assert isinstance(tower, OpenClipTextTower) and isinstance(dm.processor, OpenClipTokenizer)
    assert not any(p.requires_grad for p in tower.parameters())
    assert module.objective.fid_kind == "clip" and series(tmp_path / "run", "val/fid")
    # the tower is the clip run's: its pooled output is open_clip's encode_text of the same tokens
    clip, _, _ = load_clip_run(clip_final, "test")
    ids = dm.tokenize(["a small red circle on the left", "a big blue square"])
    with torch.no_grad():
        out = tower.cpu()(ids)
        torch.testing.assert_close(out.text_embeds, clip.encode_text(ids))
    assert out.last_hidden_state.shape == (2, ids.shape[1], tower.config.hidden_size)


def test_image_classification_run_as_fid_features(classifier_final):
    from modalforge.plugins.vision.diffusion.metrics import build_fid_kid, fid_feature_network

    feature, kind = fid_feature_network(str(classifier_final))
    assert kind == "classifier"
    metrics = build_fid_kid(feature, 8, 8)
    g = torch.Generator().manual_seed(0)
    real, fake = torch.rand(8, 3, 32, 32, generator=g), torch.rand(8, 3, 32, 32, generator=g) * 0.5
    for name in ("fid", "kid"):
        metrics[name].update(real, real=True)
        metrics[name].update(fake, real=False)
    fid, (kid, _) = metrics["fid"].compute(), metrics["kid"].compute()
    assert torch.isfinite(fid) and fid > 0 and torch.isfinite(kid)


# ---- DDP: rank zero samples ---------------------------------------------------------------
def test_under_ddp_only_rank_zero_samples_and_the_others_receive_its_figures():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    from modalforge.plugins.vision.diffusion.metrics import build_fid_kid
    from modalforge.plugins.vision.diffusion.objective import DiffusionObjective

    sent = []

    def run_rank(rank: int, strategy) -> tuple[dict, int]:
        objective = DiffusionObjective(evaluation={"samples_per_class": 2})
        calls = []
        objective._sample_metrics = lambda: calls.append(rank) or {"fid": 3.0, "sample_class_acc": 0.5}

        def broadcast(obj, src=0):  # rank zero's object reaches every rank
            if rank == 0:
                sent.append(obj)
            return sent[-1]

        strategy.broadcast = broadcast
        trainer = SimpleNamespace(world_size=2, is_global_zero=rank == 0, strategy=strategy, sanity_checking=False)
        objective.datamodule = SimpleNamespace(trainer=trainer)
        return objective.validation_epoch_metrics(), len(calls)

    assert run_rank(0, DDPStrategy()) == ({"fid": 3.0, "sample_class_acc": 0.5}, 1)
    assert run_rank(1, DDPStrategy()) == ({"fid": 3.0, "sample_class_acc": 0.5}, 0)  # no sampling, same figures
    # a sharded model needs every rank in each forward: all ranks sample
    assert run_rank(1, FSDPStrategy())[1] == 1
    # and the FID / KID of rank zero never wait for a cross-rank sync
    from modalforge.plugins.vision.diffusion.metrics import RandomConvFeatures

    assert not any(m.sync_on_compute for m in build_fid_kid(RandomConvFeatures(), 4, 4).values())
