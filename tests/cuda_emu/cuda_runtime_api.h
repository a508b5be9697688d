// Test-only stand-in for the CUDA toolkit header of this name (see storyattn_emu.h).
#pragma once
#include "storyattn_emu.h"
