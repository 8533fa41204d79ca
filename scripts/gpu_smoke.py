"""A few steps of every op family on CUDA, on both CUDA backends: the short run that
compute-sanitizer checks (scripts/gpu_check.py)."""
import torch

import fusedtrain
from fusedtrain import FusedAdamW, GradScaler


def main():
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    for backend in ("native", "triton"):
        if not fusedtrain.backends(dev)[backend][0]:
            continue
        with fusedtrain.use_backend(backend):
            model = torch.nn.Linear(257, 129, device=dev)
            opt = FusedAdamW(model.parameters(), lr=1e-3, capturable=True)
            scaler = GradScaler(dev)
            crit = fusedtrain.FusedBCEWithLogits(pos_weight=torch.rand(129, device=dev, generator=g) + 0.5)
            for _ in range(3):
                x = torch.randn(64, 257, device=dev, generator=g)
                y = torch.rand(64, 129, device=dev, generator=g)
                with torch.autocast(dev, dtype=torch.float16):
                    loss = crit(model(x), y)
                scaler.scale(loss).backward()
                scaler.step(opt, max_norm=1.0)
                scaler.update()
                opt.zero_grad(set_to_none=True)
            # views that start off a 16-byte boundary: the kernels' scalar heads
            buf = torch.randn(80000, device=dev, generator=g)
            ts = [buf[k:k + n] for k, n in ((1, 1), (3, 4097), (6, 70001))]
            fusedtrain.unscale_and_check_(ts, torch.full((), 0.5, device=dev), torch.zeros((), device=dev),
                                          compute_norm=True)
            # a step captured in a CUDA graph (its tables built inside the graph), replayed
            x = torch.randn(64, 257, device=dev, generator=g)
            y = torch.rand(64, 129, device=dev, generator=g)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                scaler.scale(crit(model(x), y)).backward()
                scaler.step(opt, max_norm=1.0)
            for _ in range(2):
                graph.replay()
            # the many-label head: chunks that do not divide L, an unknown mask, sparse positives
            head = fusedtrain.FusedLinearBCEWithLogits(257, 3000, chunk_size=1000, device=dev)
            h = torch.randn(70, 257, device=dev, generator=g, requires_grad=True)
            yh = (torch.rand(70, 3000, device=dev, generator=g) < 0.01).float()
            with torch.autocast(dev, dtype=torch.bfloat16):
                head(h, yh, unknown_mask=torch.rand(70, 3000, device=dev, generator=g) < 0.1).backward()
                head(h, yh.to_sparse_csr()).backward()
    torch.cuda.synchronize()
    print("gpu smoke: ok")


if __name__ == "__main__":
    main()
