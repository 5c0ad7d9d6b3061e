// common.wgsl: what every kernel shares (a library: kernels.py prepends it to each kernel).
//
// Binding 0 of group 0 in every kernel is the per-submit uniform `run`, written with
// queue.write_buffer before each submit; binding 1 is the kernel's own static Params uniform,
// written once at load. Everything else is per kernel (see each file's header).
//
//   @group(0) @binding(0) run: uniform Run
//     T: tokens in this submit (1 for a generation step, up to Options.chunk for prefill)

struct Run {
    T: u32,
}

@group(0) @binding(0) var<uniform> run: Run;

// Matrix-product epilogues (Seg.act of matseg.wgsl).
const ACT_NONE: u32 = 0u;
const ACT_TANH: u32 = 1u;
const ACT_SIGMOID: u32 = 2u;
const ACT_RELU_SQ: u32 = 3u;
const ACT_DECAY: u32 = 4u;   // exp(-e^-0.5 * sigmoid(x)): the RWKV-7 decay

fn sigmoid(x: f32) -> f32 {
    return 1.0 / (1.0 + exp(-x));
}

fn activate(x: f32, act: u32) -> f32 {
    switch act {
        // Some drivers build tanh from exp and return NaN for |x| > ~88; tanh(15) is already
        // 1.0 in f32, so clamping changes nothing else.
        case ACT_TANH: { return tanh(clamp(x, -15.0, 15.0)); }
        case ACT_SIGMOID: { return sigmoid(x); }
        case ACT_RELU_SQ: { let r = max(x, 0.0); return r * r; }
        // 0.606531 = e^-0.5 rounded as llama.cpp writes it, so both compute the same decay.
        case ACT_DECAY: { return exp(-0.606531 * sigmoid(x)); }
        default: { return x; }
    }
}
