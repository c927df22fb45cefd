"""The README's API example, runnable: FPET + LoRA on a timm ViT, a few training steps on generated data.

    python python/quickstart.py            # random-init ViT-Ti/16, nothing downloaded
    python python/quickstart.py --checkpoint /path/to/vit_tiny_patch16_224.pth
"""
import argparse

import timm
import torch
import torch.nn.functional as F

import fpet_kernels as fk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--checkpoint", default=None, help="local timm weights to start from")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=4)
    if args.checkpoint:
        timm.models.load_checkpoint(model, args.checkpoint, strict=False)  # the head may differ
    fk.add_pet(model, "lora")  # LoRA on q and v of every block's qkv
    fk.apply_fpet(model)  # merge tokens at block depth // 2 (197 -> 99 tokens for /16 at 224)
    print(f"trainable parameters: {fk.mark_trainable(model):,} of {sum(p.numel() for p in model.parameters()):,}")

    # Generated data: which quadrant of the image is brightest.
    images = torch.randn(32, 3, 224, 224) * 0.1
    labels = torch.arange(32) % 4
    for i, label in enumerate(labels.tolist()):
        row, col = divmod(label, 2)
        images[i, :, row * 112:(row + 1) * 112, col * 112:(col + 1) * 112] += 1.0

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for step in range(args.steps):
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        print(f"step {step}: loss {loss.item():.4f}")

    model.eval()
    with torch.inference_mode():
        accuracy = (model(images).argmax(-1) == labels).float().mean().item()
    print(f"train accuracy: {accuracy:.2f}")
    fk.remove_fpet(model)  # back to the plain timm forward (the merge adapter is dropped)


if __name__ == "__main__":
    main()
