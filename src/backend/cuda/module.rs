//! The kernels of `kernels/*.cu`, embedded in the binary, compiled by NVRTC at first use and cached on
//! disk as PTX (`$XDG_CACHE_HOME/pagellm` or `~/.cache/pagellm`, one file per source hash and GPU
//! architecture), then loaded once into the context. A later start with the same binary and GPU skips
//! NVRTC (the driver caches the PTX-to-SASS step itself).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction};
use cudarc::nvrtc::{CompileOptions, Ptx};

/// The kernel sources, in the order they are concatenated (helpers first).
const SOURCES: [(&str, &str); 5] = [
    ("common.cuh", include_str!("../../../kernels/common.cuh")),
    ("quant.cu", include_str!("../../../kernels/quant.cu")),
    ("elementwise.cu", include_str!("../../../kernels/elementwise.cu")),
    ("attention.cu", include_str!("../../../kernels/attention.cu")),
    ("mmq.cu", include_str!("../../../kernels/mmq.cu")),
];

/// Every `extern "C"` kernel the backend launches.
const NAMES: &[&str] = &[
    "quantize_q8",
    "quantize_q8k",
    "q8_to_f16",
    "q8k_to_f16",
    "mmv_q4_0",
    "mmv_q4_0r",
    "mmv_q4_1",
    "mmv_q5_0",
    "mmv_q8_0",
    "mmv_q4_k",
    "mmv_q6_k",
    "mmv1_q4_0",
    "mmv1_q4_0r",
    "mmvp_q4_0r",
    "mmv1_q4_k",
    "mmv1_q6_k",
    "mmv1_q4_1",
    "mmv1_q5_0",
    "mmv1_q8_0",
    "mmq_pack",
    "mmq_q4_k_16",
    "mmq_q4_k_32",
    "mmq_q4_k_64",
    "mmq_q6_k_16",
    "mmq_q6_k_32",
    "mmq_q6_k_64",
    "mmq_q4_k_16_n",
    "mmq_q4_k_32_n",
    "mmq_q4_k_64_n",
    "mmq_q6_k_16_n",
    "mmq_q6_k_32_n",
    "mmq_q6_k_64_n",
    "mmv_f32",
    "mmv_f16",
    "dequant_f16_f32",
    "dequant_f16_f16",
    "dequant_f16_q4_0",
    "dequant_f16_q4_0r",
    "dequant_f16_q4_1",
    "dequant_f16_q5_0",
    "dequant_f16_q8_0",
    "dequant_f16_q4_k",
    "dequant_f16_q6_k",
    "embed_f32",
    "embed_f16",
    "embed_q4_0",
    "embed_q4_0r",
    "embed_q4_1",
    "embed_q5_0",
    "embed_q8_0",
    "embed_q4_k",
    "embed_q6_k",
    "f32_to_f16",
    "rms_norm",
    "rms_norm_q",
    "rope",
    "glu",
    "glu_q",
    "add",
    "scale",
    "add_bias",
    "get_rows",
    "kv_write",
    "kv_copy_blocks",
    "kv_gather",
    "kv_scatter",
    "attn_hd64",
    "attn_hd128",
    "attn_hd256",
    "attn_hd128_g2c64",
    "attn_hd128_w16",
    "attn_hd128_g2c128",
    "attn_hd128_a4c64",
    "attn_merge",
    "argmax_rows",
    "attn_scores",
];

/// The loaded kernels by name.
pub(super) struct Kernels {
    map: HashMap<&'static str, CudaFunction>,
}

impl Kernels {
    pub fn get(&self, name: &str) -> &CudaFunction {
        self.map.get(name).unwrap_or_else(|| panic!("kernel '{name}' is not in kernels/*.cu"))
    }
}

/// The concatenated source (with `#line` markers so NVRTC errors name the right file).
fn source() -> String {
    let mut s = String::new();
    for (name, text) in SOURCES {
        s.push_str(&format!("#line 1 \"{name}\"\n"));
        s.push_str(text);
        s.push('\n');
    }
    s
}

/// FNV-1a: a hash that is stable across Rust releases (the cache outlives the binary).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in *p {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

fn cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("pagellm"))
}

/// Compiles (or reads from the cache) and loads every kernel for the context's GPU.
pub(super) fn load(ctx: &Arc<CudaContext>) -> Result<Kernels, String> {
    let (major, minor) = ctx.compute_capability().map_err(|e| format!("compute capability: {e}"))?;
    let arch = format!("compute_{major}{minor}");
    let src = source();
    let (mut v_major, mut v_minor) = (0, 0);
    // SAFETY: nvrtcVersion writes two ints; the library was found by the caller's probe.
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut v_major, &mut v_minor) };
    let nvrtc = format!("{v_major}.{v_minor}");
    let key = fnv1a(&[src.as_bytes(), arch.as_bytes(), nvrtc.as_bytes(), b"--fmad=false"]);
    let path = cache_dir().map(|d| d.join(format!("kernels-{key:016x}-{arch}.ptx")));

    let cached = path.as_ref().and_then(|p| std::fs::read_to_string(p).ok());
    let ptx = match cached {
        Some(text) => Ptx::from_src(text),
        None => {
            let opts = CompileOptions {
                // --fmad=false: no implicit FMA contraction, so float expressions round as the CPU
                // backend's Rust does (kernels/common.cuh)
                options: vec![format!("--gpu-architecture={arch}"), "--std=c++17".into(), "--fmad=false".into()],
                ..Default::default()
            };
            let ptx = cudarc::nvrtc::compile_ptx_with_opts(&src, opts).map_err(|e| match e {
                cudarc::nvrtc::CompileError::CompileError { log, .. } => {
                    format!("NVRTC failed on kernels/*.cu:\n{}", log.to_string_lossy())
                }
                other => format!("NVRTC: {other:?}"),
            })?;
            if let Some(p) = &path {
                // Best effort: a read-only home only costs a recompile next time.
                let tmp = p.with_extension(format!("tmp{}", std::process::id()));
                let ok = p.parent().is_some_and(|d| std::fs::create_dir_all(d).is_ok())
                    && std::fs::write(&tmp, ptx.to_src()).is_ok();
                if ok {
                    let _ = std::fs::rename(&tmp, p);
                }
            }
            ptx
        }
    };
    let module = ctx.load_module(ptx).map_err(|e| format!("loading the kernels: {e}"))?;
    let mut map = HashMap::new();
    for &name in NAMES {
        let f = module.load_function(name).map_err(|e| format!("kernel '{name}': {e}"))?;
        map.insert(name, f);
    }
    Ok(Kernels { map })
}
