//! Everything the serving loop needs, from one import: `use flashpage::prelude::*;`.

pub use crate::builder::BatchBuilder;
pub use crate::error::{Error, ErrorKind, Result};
pub use crate::half::{bf16, f16};
pub use crate::layout::{DType, HeadConfig, KvLayout, KvStrides};
pub use crate::ops::append::{
    AppendAt, AppendBatch, AppendRope, KvCacheMut, append_kv, append_kv_at,
};
pub use crate::ops::rope::{Rope, RopeScaling, RopeStyle, apply_rope};
pub use crate::ops::{Rows, RowsMut};
pub use crate::options::{AttentionOptions, PosEncoding};
pub use crate::pages::{PageAllocator, pages_for_budget};
pub use crate::plan::{Plan, PlanKind};
pub use crate::session::{Attention, CacheDesc, LayerArgs, Limits};
pub use crate::tensor::{Tensor, TensorMut, TensorRef};
