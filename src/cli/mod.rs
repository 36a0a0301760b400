//! The command line: `pagellm info`, `pagellm synth` (more commands arrive with later capabilities).

pub mod info;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::gguf::GgufFile;
use crate::synth;

#[derive(Parser, Debug)]
#[command(name = "pagellm", version, about = "Run quantized LLMs locally from GGUF files", long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Describe a GGUF model: architecture, shape, tokenizer, tensor types and sizes.
    Info {
        /// Path to a .gguf file.
        model: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Also list every metadata key (arrays shown by type and length).
        #[arg(long)]
        metadata: bool,
    },
    /// Write a GGUF with random weights for a named shape (benchmarks and tests; no download needed).
    Synth {
        /// Shape: tiny, tiny-gemma3, smollm2-135m, gemma3-270m, llama3-1b, llama3-8b.
        #[arg(long, default_value = "tiny")]
        shape: String,
        /// Weight type: f32, f16, bf16, q4_0, q4_1, q5_0, q5_1, q8_0, q2_k, q3_k, q4_k, q5_k, q6_k, or
        /// the mix q4_k_m. Rows too short for a K-quant fall back like llama.cpp (e.g. Q4_K -> Q5_0).
        #[arg(long = "type", default_value = "q4_0")]
        ty: String,
        /// Random seed: the same seed writes the same file.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Output path.
        #[arg(short, long)]
        output: PathBuf,
    },
}

/// Entry point for the binary: parse arguments, run, print errors as one line.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    match cli.command {
        Command::Info { model, json, metadata } => {
            let f = GgufFile::open(&model)?;
            let info = info::ModelInfo::from_file(&model, &f);
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                print!("{}", info.render());
                if metadata {
                    println!("\nmetadata ({} keys)", f.metadata.len());
                    for (k, v) in &f.metadata {
                        println!("  {k:<44} {v}");
                    }
                }
            }
            Ok(())
        }
        Command::Synth { shape, ty, seed, output } => {
            let names: Vec<&str> = synth::SHAPES.iter().map(|s| s.name).collect();
            let sh = synth::shape(&shape).ok_or_else(|| format!("unknown shape '{shape}'; known: {}", names.join(", ")))?;
            let recipe = synth::Recipe::parse(&ty).ok_or_else(|| {
                format!("unknown or unsupported weight type '{ty}'; use f32, f16, bf16, q4_0, q4_1, q5_0, q5_1, q8_0, q2_k, q3_k, q4_k, q5_k, q6_k or q4_k_m")
            })?;
            let bar = progress_bar(synth::tensor_specs(sh, recipe).len() as u64, "writing tensors");
            let bytes = synth::write_model(&output, sh, recipe, seed, |i, _| bar.set_position(i as u64))?;
            bar.finish_and_clear();
            eprintln!("wrote {} ({}, shape {}, {ty})", output.display(), info::human_bytes(bytes), sh.name);
            Ok(())
        }
    }
}

/// A progress bar on a terminal; hidden when stderr is not one (pipes, CI logs).
pub fn progress_bar(len: u64, msg: &'static str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} ({eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(msg);
    bar
}
