"""Reference point for results/zoo/shape_learning.md, not part of stitchkit: a small conv net trained on the
zoo's single-object images (32 px, default rotated world) with the category label, 1 CPU thread, tested on
the probe's held-out test images. Usage: python results/zoo/cnn_reference.py [STEPS]"""

import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from stitchkit.world import classification_set

torch.manual_seed(0)
torch.set_num_threads(1)
steps = int(sys.argv[1]) if len(sys.argv) > 1 else 600
train, test = classification_set(4000, 32, 0, "category"), classification_set(1000, 32, 1_000_001, "category")


def tensors(data):
    return torch.from_numpy(data.images).permute(0, 3, 1, 2).float() / 255 * 2 - 1, torch.from_numpy(data.labels)


def block(i, o):
    return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU())


(x, y), (x_test, y_test) = tensors(train), tensors(test)
model = nn.Sequential(block(3, 32), nn.MaxPool2d(2), block(32, 64), nn.MaxPool2d(2), block(64, 96), nn.MaxPool2d(2),
                      block(96, 96), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(96, 13))
optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 2e-3, total_steps=steps)
started = time.time()
for step in range(steps):
    batch = torch.randint(0, len(x), (64,))
    loss = F.cross_entropy(model(x[batch]), y[batch])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    schedule.step()
    if (step + 1) % 200 == 0:
        model.eval()
        with torch.no_grad():
            accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
        model.train()
        print(f"step {step + 1} {time.time() - started:.0f}s loss {loss.item():.2f} test accuracy {accuracy:.3f}")
