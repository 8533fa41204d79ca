def unscale_and_check_(tensors, inv_scale, found_inf, *, compute_norm=False):
    raise NotImplementedError("unscale: not built yet")
