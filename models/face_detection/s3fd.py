"""S3FD, the detector the official Wav2Lip uses, for users who bring the official `s3fd.pth`.

The network (VGG16 trunk + extra layers + six detection heads with scale-equitable anchors) is written
here from its state_dict layout; the weights are never downloaded. Inputs and decoding follow the
official tool: RGB frame minus (104, 117, 123), full resolution, anchors of 4x the stride at strides
4..128, variances (0.1, 0.2), NMS at IoU 0.3, faces with score > 0.5.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

log = logging.getLogger(__name__)

MEAN_RGB = (104.0, 117.0, 123.0)
MIN_SCORE = 0.5
CANDIDATE_SCORE = 0.05
NMS_IOU = 0.3

# VGG16 trunk: (name, in, out) 3x3 convs, a 2x2 max-pool after each block.
_TRUNK = (
    (("conv1_1", 3, 64), ("conv1_2", 64, 64)),
    (("conv2_1", 64, 128), ("conv2_2", 128, 128)),
    (("conv3_1", 128, 256), ("conv3_2", 256, 256), ("conv3_3", 256, 256)),
    (("conv4_1", 256, 512), ("conv4_2", 512, 512), ("conv4_3", 512, 512)),
    (("conv5_1", 512, 512), ("conv5_2", 512, 512), ("conv5_3", 512, 512)),
)
# Detection heads: (source feature, channels, classifier outputs). conv3_3's head has 4 logits:
# three background scores max-pooled into one ("max-out background") plus the face score.
_HEADS = (("conv3_3_norm", 256, 4), ("conv4_3_norm", 512, 2), ("conv5_3_norm", 512, 2),
          ("fc7", 1024, 2), ("conv6_2", 512, 2), ("conv7_2", 256, 2))


class L2Norm(nn.Module):
    """Per-position channel L2 normalisation with a learned per-channel scale (state key `weight`)."""

    def __init__(self, channels: int, scale: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), float(scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10
        return x / norm * self.weight.view(1, -1, 1, 1)


class S3FDNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        for block in _TRUNK:
            for name, cin, cout in block:
                setattr(self, name, nn.Conv2d(cin, cout, 3, 1, 1))
        # fc6 pads by 3 without dilation in the released model: its map is 4 cells larger than
        # stride 32 would give; the decoder indexes anchors the same way, so we keep it.
        self.fc6 = nn.Conv2d(512, 1024, 3, 1, 3)
        self.fc7 = nn.Conv2d(1024, 1024, 1, 1, 0)
        self.conv6_1 = nn.Conv2d(1024, 256, 1, 1, 0)
        self.conv6_2 = nn.Conv2d(256, 512, 3, 2, 1)
        self.conv7_1 = nn.Conv2d(512, 128, 1, 1, 0)
        self.conv7_2 = nn.Conv2d(128, 256, 3, 2, 1)
        self.conv3_3_norm = L2Norm(256, 10)
        self.conv4_3_norm = L2Norm(512, 8)
        self.conv5_3_norm = L2Norm(512, 5)
        for source, channels, n_cls in _HEADS:
            setattr(self, f"{source}_mbox_conf", nn.Conv2d(channels, n_cls, 3, 1, 1))
            setattr(self, f"{source}_mbox_loc", nn.Conv2d(channels, 4, 3, 1, 1))

    def _trunk(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = {}
        for block in _TRUNK:
            for name, _, _ in block:
                x = F.relu(getattr(self, name)(x))
            feats[block[-1][0]] = x
            x = F.max_pool2d(x, 2, 2)
        x = F.relu(self.fc7(F.relu(self.fc6(x))))
        feats["fc7"] = x
        x = F.relu(self.conv6_2(F.relu(self.conv6_1(x))))
        feats["conv6_2"] = x
        feats["conv7_2"] = F.relu(self.conv7_2(F.relu(self.conv7_1(x))))
        return feats

    def forward(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per level: (face probability (B, H, W), box regression (B, 4, H, W))."""
        feats = self._trunk(x)
        feats["conv3_3_norm"] = self.conv3_3_norm(feats["conv3_3"])
        feats["conv4_3_norm"] = self.conv4_3_norm(feats["conv4_3"])
        feats["conv5_3_norm"] = self.conv5_3_norm(feats["conv5_3"])
        out = []
        for source, _, n_cls in _HEADS:
            conf = getattr(self, f"{source}_mbox_conf")(feats[source])
            loc = getattr(self, f"{source}_mbox_loc")(feats[source])
            if n_cls == 4:
                background = conf[:, :3].max(dim=1, keepdim=True).values
                conf = torch.cat([background, conf[:, 3:]], dim=1)
            out.append((F.softmax(conf, dim=1)[:, 1], loc))
        return out


def load_s3fd(path: str | Path, device: str | torch.device = "cpu") -> S3FDNet:
    """Load the official s3fd.pth (a plain state_dict) safely; errors name the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file (pass the official s3fd.pth with --s3fd-weights)")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated files, zip errors: all mean "not a checkpoint"
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({exc})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state_dict of the S3FD network")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    net = S3FDNet()
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    wrong = sorted(k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or wrong:
        raise ValueError(f"{path}: not the official S3FD checkpoint (missing {missing[:3]}, "
                         f"wrong shapes {wrong[:3]}); use s3fd.pth from the Wav2Lip face_detection release")
    net.load_state_dict({k: state[k] for k in expected})
    return net.to(device).eval()


def decode_level(prob: np.ndarray, loc: np.ndarray, stride: int) -> np.ndarray:
    """One level's (H, W) probabilities and (4, H, W) regressions -> (K, 5) x1, y1, x2, y2, score."""
    ys, xs = np.nonzero(prob > CANDIDATE_SCORE)
    if len(ys) == 0:
        return np.zeros((0, 5), np.float32)
    anchor = 4.0 * stride
    cx = stride / 2 + xs * stride + loc[0, ys, xs] * 0.1 * anchor
    cy = stride / 2 + ys * stride + loc[1, ys, xs] * 0.1 * anchor
    w = anchor * np.exp(loc[2, ys, xs] * 0.2)
    h = anchor * np.exp(loc[3, ys, xs] * 0.2)
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, prob[ys, xs]], axis=1).astype(np.float32)


def nms(dets: np.ndarray, iou: float = NMS_IOU) -> np.ndarray:
    """Greedy NMS, highest score first (as the official detector)."""
    order = np.argsort(-dets[:, 4])
    dets = dets[order]
    keep = []
    alive = np.ones(len(dets), bool)
    area = (dets[:, 2] - dets[:, 0]) * (dets[:, 3] - dets[:, 1])
    for i in range(len(dets)):
        if not alive[i]:
            continue
        keep.append(i)
        ix1 = np.maximum(dets[i, 0], dets[:, 0])
        iy1 = np.maximum(dets[i, 1], dets[:, 1])
        ix2 = np.minimum(dets[i, 2], dets[:, 2])
        iy2 = np.minimum(dets[i, 3], dets[:, 3])
        inter = np.clip(ix2 - ix1, 0, None) * np.clip(iy2 - iy1, 0, None)
        overlap = inter / np.maximum(area[i] + area - inter, 1e-9)
        alive &= overlap <= iou
    return dets[keep]


class S3FD:
    """`detect(frame_bgr)` -> (K, 5) boxes x1, y1, x2, y2, score (score > 0.5), best first."""

    def __init__(self, weights: str | Path, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.net = load_s3fd(weights, self.device)

    @torch.inference_mode()
    def detect(self, image_bgr: np.ndarray) -> np.ndarray:
        rgb = image_bgr[..., ::-1].astype(np.float32) - np.array(MEAN_RGB, np.float32)
        x = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))[None].to(self.device)
        levels = self.net(x)
        per_level = [decode_level(scores[0].float().cpu().numpy(), offsets[0].float().cpu().numpy(), 2 ** (i + 2))
                     for i, (scores, offsets) in enumerate(levels)]
        dets = np.concatenate(per_level) if per_level else np.zeros((0, 5), np.float32)
        if len(dets) == 0:
            return dets
        dets = nms(dets)
        dets = dets[dets[:, 4] > MIN_SCORE]
        h, w = image_bgr.shape[:2]
        dets[:, [0, 2]] = dets[:, [0, 2]].clip(0, w)
        dets[:, [1, 3]] = dets[:, [1, 3]].clip(0, h)
        return dets
