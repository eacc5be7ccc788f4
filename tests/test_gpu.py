"""GPU checks (skipped without CUDA): the ported network and the LLM backend give the CPU's answers on cuda."""

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu


def test_sklesion_net_matches_cpu_on_cuda():
    from models.xception import SklesionNet

    torch.manual_seed(0)
    net = SklesionNet().eval()
    x = torch.rand(2, 3, 254, 254) * 255
    meta = torch.zeros(2, 10)
    with torch.inference_mode():
        p_cpu, f_cpu = net(x, meta)
        p_gpu, f_gpu = net.cuda()(x.cuda(), meta.cuda())
    np.testing.assert_allclose(p_gpu.cpu().numpy(), p_cpu.numpy(), atol=1e-4)
    np.testing.assert_allclose(f_gpu.cpu().numpy(), f_cpu.numpy(), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiny_llm_backend_runs_on_cuda(tmp_path, dtype):
    from models.backends.hf_llm import TransformersLLM
    from agent.testing import build_tiny_llama

    path = build_tiny_llama(tmp_path / "tiny")
    conv = [{"role": "user", "content": "hello there"}]
    cpu = TransformersLLM(str(path))
    gpu = TransformersLLM(str(path), device="cuda", dtype=dtype)
    assert gpu.chat([conv], max_new_tokens=4)[0] is not None
    s_cpu = cpu.score_continuations(conv, "Answer: ", ["yes", "no"])
    s_gpu = gpu.score_continuations(conv, "Answer: ", ["yes", "no"])
    tol = 1e-3 if dtype == "float32" else 0.2
    np.testing.assert_allclose(s_gpu, s_cpu, atol=tol)
