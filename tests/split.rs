//! `--gpu-layers`: a model split over two backends by layer ([`SplitBackend`]) computes what either
//! backend alone computes. Here both sides are CPU backends with their own memory (no GPU needed): a
//! buffer not copied at the boundary, a K/V pool on the wrong side or a weight missing from a side would
//! show as different logits or a panic. tests/cuda.rs runs the same split with the GPU as the device side.

mod common;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use pagellm::backend::cpu::{CpuBackend, Kernels};
use pagellm::backend::split::SplitBackend;
use pagellm::backend::Backend;
use pagellm::engine::{Engine, EngineOptions};
use pagellm::gguf::GgufFile;
use pagellm::model::{Model, ModelOptions};

fn cpu() -> Arc<dyn Backend> {
    Arc::new(CpuBackend::new(2, Kernels::detect()).unwrap())
}

#[test]
fn split_models_equal_one_backend() {
    for (rel, prompt) in [(common::SMOLLM2, vec![504u32, 3458, 282, 4649, 314]), (common::GEMMA3, vec![2u32, 651, 6037, 529, 9405])] {
        let Some(path) = common::model_or_skip(rel) else { continue };
        let file = Arc::new(GgufFile::open(&path).unwrap());
        let opts = ModelOptions { ctx: 64, threads: 2 };
        let want = common::greedy_logits(&Model::load_on(file.clone(), opts, cpu()).unwrap(), &prompt, 8);
        let n_layers = pagellm::model::Config::from_gguf(&file).unwrap().n_layers;
        let tied = file.tensor("output.weight").is_none();
        for dev_layers in [1, n_layers / 2, n_layers - 1] {
            let (host, dev) = (Arc::new(CpuBackend::new(2, Kernels::detect()).unwrap()), Arc::new(CpuBackend::new(2, Kernels::detect()).unwrap()));
            let split = Arc::new(SplitBackend::new(host.clone(), dev.clone(), n_layers, dev_layers, tied));
            let model = Model::load_on(file.clone(), opts, split).unwrap();
            let got = common::greedy_logits(&model, &prompt, 8);
            for (step, (g, w)) in got.iter().zip(&want).enumerate() {
                let differ = common::bits_differ(g, w);
                assert_eq!(differ, 0, "{rel}, last {dev_layers} of {n_layers} layers split off: step {step}, {differ} logits differ");
            }
            // the output projection ran on the device side: that side packed the Q8_0 output matrix
            // (where the kernel table packs Q8_0: 576 bytes per 16 rows x 32 columns)
            if dev.repacks(pagellm::dtype::GgmlType::Q8_0) {
                let cfg = pagellm::model::Config::from_gguf(&file).unwrap();
                let out_packed = cfg.n_vocab.div_ceil(16) * (cfg.dim / 32) * 576;
                let d = dev.weight_bytes_copied();
                assert!(d >= out_packed, "{rel}: the output projection did not run on the device side ({d} bytes packed there)");
            }
            println!("{rel}: last {dev_layers} of {n_layers} layers on the second backend: 9 steps of logits equal, bit for bit");
        }
    }
}

/// Through the engine (the shared KV pool, prefix sharing and copy-on-write of a partial block): two
/// requests sharing a prefix give the same text as on one backend.
#[test]
fn split_engine_reuses_prefixes() {
    let Some(path) = common::model_or_skip(common::SMOLLM2) else { return };
    let file = Arc::new(GgufFile::open(&path).unwrap());
    let n_layers = pagellm::model::Config::from_gguf(&file).unwrap().n_layers;
    let run = |backend: Arc<dyn Backend>| {
        let model = Model::load_on(file.clone(), ModelOptions { ctx: 256, threads: 2 }, backend).unwrap();
        let opts = EngineOptions { ctx: 256, prefix_cache: true, budget: None };
        let mut engine = Engine::new(model, vec![], opts).unwrap();
        let base: Vec<u32> = (0..40).map(|i| 1000 + 7 * i).collect();
        let (mut outs, mut cached) = (Vec::new(), 0);
        for tail in [vec![3u32, 5, 8], vec![3u32, 9]] {
            let prompt: Vec<u32> = base.iter().chain(&tail).copied().collect();
            let mut sampler = pagellm::sampling::Sampler::new(pagellm::sampling::SamplingParams::greedy());
            let g = engine.generate(&prompt, &mut sampler, 12, &AtomicBool::new(false), &mut |_| true).unwrap();
            cached += g.cached_tokens;
            outs.push(g.tokens);
        }
        (outs, cached)
    };
    let (want, _) = run(cpu());
    let split = Arc::new(SplitBackend::new(cpu(), cpu(), n_layers, n_layers / 2, true));
    let (got, reused) = run(split);
    assert!(reused > 0, "the second request re-used no cached prefix");
    assert_eq!(got, want, "split backend changed the generated tokens");
}
