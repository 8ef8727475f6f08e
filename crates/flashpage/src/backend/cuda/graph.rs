//! CUDA-graph replay of captured runs.

use cudarc::driver::DevicePtr;

use super::device::{DeviceWorkspace, RunSignature, driver_err};
use crate::error::{Error, Result};
use crate::plan::Plan;

/// A captured sequence of [`super::CudaBackend::run`] calls, replayable for any plan with
/// the captured signature (in graph mode: same capacity, heads, options, page size and
/// buffers) once that plan is uploaded into the captured int workspace.
///
/// ```text
/// backend.upload_plan(&plan, &mut ws)?;
/// backend.prepare(&plan, DType::BF16)?;
/// let graph = backend.capture(|b| b.run(&plan, args, &mut ws))?;
/// // next step:
/// plan.replan(&next_batch, &options)?;      // rewrites the int image in place
/// backend.upload_plan(&plan, &mut ws)?;     // one host-to-device copy, outside the graph
/// unsafe { graph.launch(&plan, &ws)? }; // the captured buffers are still alive
/// ```
pub struct CudaGraph {
    graph: cudarc::driver::CudaGraph,
    sig: Option<RunSignature>,
}

impl std::fmt::Debug for CudaGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaGraph")
            .field("has_runs", &self.sig.is_some())
            .finish()
    }
}

impl CudaGraph {
    pub(crate) fn new(graph: cudarc::driver::CudaGraph, sig: Option<RunSignature>) -> Self {
        CudaGraph { graph, sig }
    }

    /// Replays the graph for `plan`, which must have the captured signature and be the plan
    /// held by `ws` (the captured workspace). Asynchronous, on the backend's stream.
    ///
    /// Checked here: the plan's signature, the int workspace, and that the batch fits the
    /// captured q/o rows and page-id array (so no row is silently left stale).
    ///
    /// # Safety
    ///
    /// The graph holds the raw device addresses of every buffer of the captured runs (q, K,
    /// V, o, lse, page ids, both workspaces). They must all still be allocated, unmoved, and
    /// not written by other streams while the replay runs; the page ids must be in
    /// `0..num_pages` of the captured cache.
    pub unsafe fn launch(&self, plan: &Plan, ws: &DeviceWorkspace) -> Result<()> {
        if let Some(sig) = &self.sig {
            let check = |what: &'static str, ok: bool| {
                if ok {
                    Ok(())
                } else {
                    Err(Error::PlanMismatch {
                        what,
                        expected: "the value captured in the graph".into(),
                        actual: "a different value (capture a new graph)".into(),
                    })
                }
            };
            let p = &sig.params;
            let h = plan.heads();
            let caps = plan.capacities();
            let [ro, wo, mo] = plan.int_offsets();
            check(
                "heads",
                p.num_qo_heads as usize == h.num_qo_heads()
                    && p.group as usize == h.group_size()
                    && sig.variant.head_dim == h.head_dim(),
            )?;
            check(
                "plan capacities",
                (
                    p.req_cap as usize,
                    p.work_cap as usize,
                    p.merge_cap as usize,
                ) == (caps.requests, caps.work_items, caps.merge_rows)
                    && (
                        p.req_off as usize,
                        p.work_off as usize,
                        p.merge_off as usize,
                    ) == (ro, wo, mo)
                    && sig.float_req == plan.requirement().float,
            )?;
            check(
                "page size and kv index",
                p.page_size as usize == plan.page_size() && (p.paged != 0) == plan.is_paged(),
            )?;
            // Options and launch choices: recompute the parameters over the captured buffers.
            let again = super::launch::params_like(plan, p);
            check("attention options", again == *p)?;
            check(
                "kernel variant",
                super::launch::DecodeVariant::for_plan_kv(
                    plan,
                    sig.variant.dtype,
                    sig.variant.kv_dtype,
                ) == sig.variant
                    && plan.kind() == sig.kind
                    && (caps.merge_rows > 0 && (plan.is_graph() || plan.num_merge_rows() > 0))
                        == sig.launch_merge,
            )?;
            check("int workspace", {
                let (addr, _g) = ws.int.device_ptr(ws.int.stream());
                addr == sig.int_ws
            })?;
            let rows = plan.num_q_rows();
            if rows as i64 > p.qo_rows {
                return Err(Error::TensorShape {
                    tensor: "q/o captured in the graph",
                    expected: format!("at least {rows} rows for this batch"),
                    actual: format!("{} rows", p.qo_rows),
                });
            }
            for r in 0..plan.batch_size() {
                let Some(req) = plan.request(r) else { continue };
                let (end, have, what) = if plan.is_paged() {
                    (
                        req.kv_start + req.kv_len.div_ceil(plan.page_size()),
                        p.num_indices,
                        "kv_indices captured in the graph",
                    )
                } else {
                    (
                        req.kv_start + req.kv_len,
                        p.num_pages as i64,
                        "ragged k/v captured in the graph",
                    )
                };
                if end as i64 > have {
                    return Err(Error::TensorShape {
                        tensor: what,
                        expected: format!("at least {end} entries (request {r} ends there)"),
                        actual: format!("{have} entries"),
                    });
                }
            }
            if !ws.holds(plan) {
                return Err(Error::PlanMismatch {
                    what: "int workspace",
                    expected: "this plan's int image".into(),
                    actual: "another plan's (call upload_plan after replanning)".into(),
                });
            }
        }
        self.graph
            .launch()
            .map_err(|e| driver_err("launching the graph", e))
    }
}
