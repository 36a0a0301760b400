//! Deferred launches and CUDA graphs of a forward step.
//!
//! Inside [`Backend::run`](crate::backend::Backend::run) (one forward step) kernel launches are queued
//! instead of issued, and issued together at the next flush: a read-back, a host write, an allocation
//! or reallocation of a scratch array, a cuBLAS call, the end of the step. Host lists (token ids,
//! positions, slot mapping, block tables) are still uploaded when the op is called, into device arrays
//! whose addresses are kernel arguments; an upload that would change an array a queued launch reads
//! flushes first (`CudaBackend::upload`).
//!
//! ```text
//! step N:   uploads ... [launch list L]  flush: L != last list      -> launched one by one, L kept
//! step N+1: uploads ... [launch list L]  flush: L == last list      -> captured into a graph, replayed
//! step N+2: uploads ... [launch list L]  flush: L in the graph cache -> one cuGraphLaunch
//! ```
//! A decode step's list (kernels, grids, every argument) is the same from token to token until a
//! shape changes (a block table outgrows its device array, a new 512-key attention split), so decode
//! replays one graph per step: ~550 launches become one driver call. Lists shorter than
//! [`GRAPH_MIN_OPS`] are never captured (prefill chunks between cuBLAS calls).
//!
//! Also: adjacent products of one input (Q, K, V; gate, up) are merged into one launch of up to three
//! parts (`mmv_*` kernels take three (weight, rows, output) triples): each row's result is computed by
//! the same code as alone, only the grid is shared.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::{sys as drv, CudaGraph, CudaStream, DriverError};

use super::A;

/// Launch lists shorter than this are never captured.
pub(super) const GRAPH_MIN_OPS: usize = 32;
/// Graphs kept (the oldest is dropped first).
const GRAPH_CACHE: usize = 8;
/// Kernel-argument positions of the `mmv_*` kernels (kernels/quant.cu, `MMV_ARGS`): the shared
/// activations, then three parts of (weight, rows, output).
const MMV_SHARED: usize = 6;
const MMV_PART0: usize = 6;

/// One kernel launch.
pub(super) struct Op {
    /// The `CUfunction` (a raw pointer, kept as an integer so the queue is `Send`).
    pub f: usize,
    pub grid: (u32, u32, u32),
    block: u32,
    pub args: Vec<A>,
    /// An `mmv_*` launch: later products of the same activations may join it (blocks per part).
    mmv_rows_per_block: Option<u32>,
}

impl Op {
    pub fn new(f: drv::CUfunction, grid: (u32, u32, u32), block: u32, args: &[A]) -> Op {
        Op { f: f as usize, grid, block, args: args.to_vec(), mmv_rows_per_block: None }
    }

    /// An `mmv_*` launch of one part (its arguments in `MMV_ARGS` order, parts 1 and 2 empty).
    pub fn mmv(f: drv::CUfunction, grid: (u32, u32, u32), block: u32, args: &[A], rows_per_block: u32) -> Op {
        Op { mmv_rows_per_block: Some(rows_per_block), ..Op::new(f, grid, block, args) }
    }

    fn key(&self, out: &mut Vec<u64>) {
        out.extend([self.f as u64, self.grid.0 as u64, self.grid.1 as u64, self.grid.2 as u64, self.block as u64, self.args.len() as u64]);
        out.extend(self.args.iter().map(|a| match *a {
            A::P(v) => v,
            A::I(v) => v as u32 as u64,
            A::U(v) => v as u64,
            A::F(v) => v.to_bits() as u64,
            A::L(v) => v as u64,
        }));
    }

    /// Issues the launch on `stream` (queued or captured by the driver); `pdl`: with programmatic
    /// stream serialization, so it may start while the stream's previous kernel finishes (every kernel
    /// waits for its predecessor in `pdl_enter`, kernels/common.cuh).
    fn try_issue(&self, stream: &CudaStream, pdl: bool) -> Result<(), DriverError> {
        let mut vals = self.args.clone();
        let mut ptrs: Vec<*mut c_void> = vals
            .iter_mut()
            .map(|a| match a {
                A::P(v) => v as *mut u64 as *mut c_void,
                A::I(v) => v as *mut i32 as *mut c_void,
                A::U(v) => v as *mut u32 as *mut c_void,
                A::F(v) => v as *mut f32 as *mut c_void,
                A::L(v) => v as *mut i64 as *mut c_void,
            })
            .collect();
        // SAFETY: the argument list matches the kernel's signature (each call site mirrors its .cu
        // declaration), every pointer is a live device allocation of the size the kernel reads (the
        // queue is flushed before any of them is freed or reallocated), and the driver copies the
        // argument values before returning.
        let f = self.f as drv::CUfunction;
        if !pdl {
            // SAFETY: as above.
            return unsafe { cudarc::driver::result::launch_kernel(f, self.grid, (self.block, 1, 1), 0, stream.cu_stream(), &mut ptrs) };
        }
        // SAFETY: a zeroed attribute value is a valid union (plain integers), and the id says which
        // member the driver reads.
        let mut attr: drv::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = drv::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let config = drv::CUlaunchConfig {
            gridDimX: self.grid.0,
            gridDimY: self.grid.1,
            gridDimZ: self.grid.2,
            blockDimX: self.block,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: 0,
            hStream: stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: 1,
        };
        // SAFETY: as above; `config` and `attr` outlive the call, which copies them.
        unsafe { drv::cuLaunchKernelEx(&config, f, ptrs.as_mut_ptr(), std::ptr::null_mut()) }.result()
    }
}

/// A captured graph and the launch list it replays.
struct Graph {
    key: Vec<u64>,
    exec: CudaGraph,
}

// SAFETY: a graph is only touched under the queue's mutex (launched, or dropped), never concurrently.
unsafe impl Send for Graph {}

/// Launches waiting for the next flush, and the graph cache.
pub(super) struct Queue {
    /// Inside `run`: launches are queued (else issued at once).
    pub recording: bool,
    /// Whether graphs are used (`PAGELLM_CUDA_GRAPH=0` turns them off, for comparisons).
    use_graphs: bool,
    /// Whether products of one input are merged (`PAGELLM_CUDA_FUSE=0` turns it off).
    fuse: bool,
    /// Whether launches use programmatic dependent launch ([`Op::issue`]).
    pdl: bool,
    /// Bumped by every flush: an upload made in this epoch may be read by a queued launch.
    pub epoch: u64,
    ops: Vec<Op>,
    /// The list of the last flush that was launched one by one.
    last: Vec<u64>,
    graphs: Vec<Graph>,
    /// Flushes replayed from a graph, and graphs captured (for notes and tests).
    pub replays: u64,
    pub captures: u64,
}

impl Queue {
    pub fn new(use_graphs: bool, fuse: bool, pdl: bool) -> Queue {
        Queue { recording: false, use_graphs, fuse, pdl, epoch: 0, ops: Vec::new(), last: Vec::new(), graphs: Vec::new(), replays: 0, captures: 0 }
    }

    /// Whether launches inside `run` are deferred (with neither graphs nor merging they are issued at once).
    pub fn defers(&self) -> bool {
        self.use_graphs || self.fuse
    }

    pub fn has_pending(&self) -> bool {
        !self.ops.is_empty()
    }

    /// The last queued launch, while launches are queued (the backend folds a launch into the next one
    /// that can do its work: a residual add into the norm after it, RoPE of K into RoPE of Q).
    pub fn last_mut(&mut self) -> Option<&mut Op> {
        if self.recording {
            self.ops.last_mut()
        } else {
            None
        }
    }

    /// Drops the last queued launch (its work folded into the next one).
    pub fn pop(&mut self) {
        self.ops.pop();
    }

    /// Issues `op` now. A driver that refuses a programmatic dependent launch gets this one and every
    /// later one without it (a note on stderr), instead of a failed step.
    pub fn issue(&mut self, op: &Op, stream: &CudaStream) {
        match op.try_issue(stream, self.pdl) {
            Ok(()) => {}
            Err(e) if self.pdl => {
                eprintln!("note: the CUDA driver refused a programmatic dependent launch ({e}); launching without it");
                self.pdl = false;
                op.try_issue(stream, false).unwrap_or_else(|e| panic!("cuda launch failed: {e}"));
            }
            Err(e) => panic!("cuda launch failed: {e}"),
        }
    }

    /// Queues `op`; an `mmv_*` launch joins the previous one when that is an `mmv_*` launch of the same
    /// kernel and activations with a free part and another output.
    pub fn push(&mut self, op: Op) {
        if let (Some(rpb), Some(prev), true) = (op.mmv_rows_per_block, self.ops.last_mut(), self.fuse) {
            let same = prev.mmv_rows_per_block == Some(rpb) && prev.f == op.f && prev.block == op.block && prev.args[..MMV_SHARED] == op.args[..MMV_SHARED];
            if same {
                let out = op.args[MMV_PART0 + 2];
                let free = (1..3).find(|&p| matches!(prev.args[MMV_PART0 + 3 * p + 1], A::I(0)));
                let clash = (0..3).any(|p| prev.args[MMV_PART0 + 3 * p + 2] == out);
                if let (Some(p), false) = (free, clash) {
                    prev.args[MMV_PART0 + 3 * p..MMV_PART0 + 3 * p + 3].copy_from_slice(&op.args[MMV_PART0..MMV_PART0 + 3]);
                    prev.grid.0 += op.grid.0;
                    return;
                }
            }
        }
        self.ops.push(op);
    }

    /// Issues every queued launch: by replaying a cached graph when one has this exact list, by
    /// capturing a graph when the list repeats the last one, else one by one.
    pub fn flush(&mut self, stream: &Arc<CudaStream>) {
        if self.ops.is_empty() {
            return;
        }
        self.epoch += 1;
        let ops = std::mem::take(&mut self.ops);
        if self.use_graphs && ops.len() >= GRAPH_MIN_OPS {
            let mut key = Vec::with_capacity(ops.len() * 16);
            for op in &ops {
                op.key(&mut key);
            }
            if let Some(i) = self.graphs.iter().position(|g| g.key == key) {
                self.graphs[i].exec.launch().unwrap_or_else(|e| panic!("cuda graph launch failed: {e}"));
                self.replays += 1;
                return;
            }
            if key == self.last {
                // a driver that cannot capture programmatic launches gets graphs without them
                let mut graph = capture(stream, &ops, self.pdl);
                if graph.is_none() && self.pdl {
                    graph = capture(stream, &ops, false);
                    if graph.is_some() {
                        eprintln!("note: the CUDA driver cannot capture programmatic dependent launches; launching without them");
                        self.pdl = false;
                    }
                }
                if let Some(exec) = graph {
                    exec.launch().unwrap_or_else(|e| panic!("cuda graph launch failed: {e}"));
                    if self.graphs.len() == GRAPH_CACHE {
                        self.graphs.remove(0);
                    }
                    self.graphs.push(Graph { key, exec });
                    self.captures += 1;
                    self.last.clear();
                    return;
                }
            }
            self.last = key;
        }
        for op in &ops {
            self.issue(op, stream);
        }
    }
}

/// Records `ops` into a graph (nothing runs); `None` when the driver refuses a launch or the graph
/// (then they are issued one by one).
fn capture(stream: &Arc<CudaStream>, ops: &[Op], pdl: bool) -> Option<CudaGraph> {
    stream.begin_capture(drv::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).ok()?;
    for op in ops {
        if op.try_issue(stream, pdl).is_err() {
            // leaves capture mode; the half-recorded graph is dropped
            let _ = stream.end_capture(drv::CUgraphInstantiate_flags(0));
            return None;
        }
    }
    stream.end_capture(drv::CUgraphInstantiate_flags(0)).ok().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mmv(f: usize, act: u64, w: u64, rows: i32, out: u64) -> Op {
        let mut args = vec![A::P(act), A::P(act + 1), A::P(act + 2), A::P(act + 3), A::I(4096), A::I(1)];
        args.extend([A::P(w), A::I(rows), A::P(out), A::P(0), A::I(0), A::P(0), A::P(0), A::I(0), A::P(0)]);
        Op::mmv(f as drv::CUfunction, (blocks(rows), 1, 1), 128, &args, 4)
    }

    fn blocks(rows: i32) -> u32 {
        (rows as u32).div_ceil(4)
    }

    fn other(f: usize) -> Op {
        Op::new(f as drv::CUfunction, (1, 1, 1), 256, &[A::P(1), A::I(2)])
    }

    #[test]
    fn products_of_one_input_merge_into_three_parts() {
        let mut q = Queue::new(true, true, false);
        q.push(other(1)); // the quantize launch
        q.push(mmv(7, 100, 1000, 4096, 50)); // Q
        q.push(mmv(7, 100, 2000, 1024, 60)); // K
        q.push(mmv(7, 100, 3000, 1024, 70)); // V
        q.push(mmv(7, 100, 4000, 1024, 80)); // a fourth: a new launch
        q.push(mmv(7, 200, 5000, 64, 90)); // other activations: a new launch
        q.push(mmv(8, 200, 6000, 64, 91)); // other kernel: a new launch
        q.push(mmv(8, 200, 6000, 64, 91)); // same output again: never merged
        q.push(other(1));
        assert_eq!(q.ops.len(), 7);
        let m = &q.ops[1];
        assert_eq!(m.grid.0, blocks(4096) + 2 * blocks(1024));
        assert_eq!(&m.args[6..], &[A::P(1000), A::I(4096), A::P(50), A::P(2000), A::I(1024), A::P(60), A::P(3000), A::I(1024), A::P(70)]);
        assert_eq!(q.ops[2].args[7], A::I(1024));
        assert_eq!(q.ops[2].args[10], A::I(0));
        let mut off = Queue::new(true, false, false);
        off.push(mmv(7, 100, 1000, 4096, 50));
        off.push(mmv(7, 100, 2000, 1024, 60));
        assert_eq!(off.ops.len(), 2, "PAGELLM_CUDA_FUSE=0 merges nothing");
    }
}
