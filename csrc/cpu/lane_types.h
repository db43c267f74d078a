// Short names for the SIMD-across-blocks types, shared by the CPU kernel files.
#pragma once

#include "mbf/lanes.h"

namespace mbf {
namespace cpu {

template <typename T>
using Ln = lanes::Lanes<T>;
template <typename T>
using V = typename Ln<T>::V;  // one value per block (lane)
template <typename T>
using M = typename Ln<T>::M;  // one mask / integer per block (lane)
using lanes::tri_index;

}  // namespace cpu
}  // namespace mbf
