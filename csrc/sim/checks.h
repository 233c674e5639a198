// Deliberately broken kernels the CPU layer must reject (see checks.cu).
#pragma once

#include <string>
#include <vector>

#include "common/launch.h"

namespace gf::sim_checks {
std::vector<std::string> names();
// src: >= 4 * 32 + 4 floats; out: >= 64 floats (or arg * 64 for "clean").
void run(const std::string& name, const float* src, float* out, int arg, const DeviceInfo& dev);
void launch_with(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                 size_t smem, bool opt_in, const DeviceInfo& dev);
}  // namespace gf::sim_checks
