//! Merge strategies: after a delete's relink, which runs of sealed layers to compact, in
//! what order, and where the result goes.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::{Error, LINEAGE_SLACK};

/// Built-in strategies; parsed from the CLI; Display gives the same names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum StrategyKind {
    /// Metadata only: the deleted checkpoint's layers join its child's stack.
    Relink,
    /// The child's whole sealed stack (with the deleted layers) is rewritten into one new
    /// layer, sequential by disk offset.
    CompactIntoChild,
    /// The largest of the deleted checkpoint's layers absorbs the live blocks of the rest of
    /// the child's sealed stack (only those are copied).
    CompactIntoParent,
    /// Relink now; compact the stack once its depth or garbage crosses a bound.
    Threshold,
    /// Picks by estimated cost (see `docs/DESIGN.md`).
    #[default]
    Auto,
}

impl StrategyKind {
    /// Every built-in, in CLI order.
    pub const ALL: [StrategyKind; 5] = [
        StrategyKind::Relink,
        StrategyKind::CompactIntoChild,
        StrategyKind::CompactIntoParent,
        StrategyKind::Threshold,
        StrategyKind::Auto,
    ];

    /// The CLI name.
    pub fn name(self) -> &'static str {
        match self {
            StrategyKind::Relink => "relink",
            StrategyKind::CompactIntoChild => "compact-into-child",
            StrategyKind::CompactIntoParent => "compact-into-parent",
            StrategyKind::Threshold => "threshold",
            StrategyKind::Auto => "auto",
        }
    }
}

impl std::str::FromStr for StrategyKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        StrategyKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "unknown merge strategy {s:?} (one of: relink, compact-into-child, compact-into-parent, threshold, auto)"
                ))
            })
    }
}

impl std::fmt::Display for StrategyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A stack of layers in the tree: a node's own layers, or Now's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum StackRef {
    Node(u64),
    Now,
}

/// What a strategy knows about one layer.
#[derive(Clone, Debug, Serialize)]
pub struct LayerStat {
    pub id: u64,
    /// Records in its log (blocks it wrote, counting rewrites), from the log's length.
    pub records: u64,
    /// Blocks for which this layer holds the newest version within its stack (measured by
    /// scanning the stack's logs; `None` when not measured).
    pub live: Option<u64>,
    /// Bytes the host allocated for its files.
    pub allocated_bytes: u64,
    /// True for the layers the delete just moved into this stack.
    pub from_deleted: bool,
}

/// What a strategy knows about one stack.
#[derive(Clone, Debug, Serialize)]
pub struct StackStat {
    pub at: StackRef,
    /// A visible checkpoint or Now (false for a hidden node shared by several children).
    pub visible: bool,
    /// Oldest first. For Now the last one is the active layer.
    pub layers: Vec<LayerStat>,
    /// How many layers from the front are sealed (can be merged): all of a node's, all but
    /// the active one of Now's.
    pub sealed: usize,
    /// Set when a merge job already works on this stack: no move may touch it.
    pub busy: bool,
}

impl StackStat {
    /// Distinct live blocks of the sealed part, if measured.
    pub fn live_blocks(&self) -> Option<u64> {
        self.layers[..self.sealed].iter().map(|l| l.live).sum()
    }

    /// Records of the sealed part.
    pub fn records(&self) -> u64 {
        self.layers[..self.sealed].iter().map(|l| l.records).sum()
    }

    /// Fraction of the sealed part's records that no read can reach (0 when not measured).
    pub fn garbage(&self) -> f64 {
        let r = self.records();
        match self.live_blocks() {
            Some(live) if r > 0 => 1.0 - live as f64 / r as f64,
            _ => 0.0,
        }
    }
}

/// The tree as a strategy sees it, after the delete's relink.
#[derive(Clone, Debug, Serialize)]
pub struct Situation {
    /// The deleted checkpoint ("" for a maintenance pass).
    pub deleted: String,
    /// The stack that received the deleted checkpoint's layers (None when it had several
    /// children and stays hidden, or for maintenance).
    pub target: Option<StackRef>,
    pub stacks: Vec<StackStat>,
    pub visible_checkpoints: usize,
}

impl Situation {
    /// The stack at `at`.
    pub fn stack(&self, at: StackRef) -> Option<&StackStat> {
        self.stacks.iter().find(|s| s.at == at)
    }
}

/// Where a compacted run goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Placement {
    /// A new layer file holding every live block of the run, sequential by disk offset.
    NewLayer,
    /// The run's layer at this index (0 = the run's first) absorbs the other layers' live
    /// blocks: only those are copied, appended to its files.
    Absorb(usize),
}

/// One data movement: layers `first..first+len` of stack `stack` become one layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Move {
    pub stack: StackRef,
    pub first: usize,
    pub len: usize,
    pub placement: Placement,
}

/// What to move, in what order, where to. `plan` sees the tree after the relink (which is
/// already committed when the moves run); moves run in the order returned. A move may only
/// cover sealed layers of one stack (`first + len <= sealed`) of a stack that is not busy;
/// anything else is refused with an error naming the strategy.
pub trait Strategy: Send + Sync {
    fn name(&self) -> &str;
    fn plan(&self, situation: &Situation) -> Vec<Move>;
    /// Whether `plan` looks at [`LayerStat::live`] of the delete's target stack: counting
    /// it scans the stack's logs while the delete holds the disk (false leaves it `None`).
    fn measures(&self) -> bool {
        true
    }
}

/// The whole sealed part of `s`, if there is something to merge (two layers or more).
fn whole(s: &StackStat, placement: Placement) -> Option<Move> {
    (s.sealed >= 2 && !s.busy).then_some(Move {
        stack: s.at,
        first: 0,
        len: s.sealed,
        placement,
    })
}

/// The index of the sealed layer with the most live blocks (records when not measured),
/// among the layers `pick` accepts; ties go to the oldest.
fn largest(s: &StackStat, pick: impl Fn(&LayerStat) -> bool) -> Option<usize> {
    let mut best: Option<(usize, u64)> = None;
    for (i, l) in s.layers[..s.sealed].iter().enumerate() {
        if !pick(l) {
            continue;
        }
        let w = l.live.unwrap_or(l.records);
        if best.is_none_or(|(_, bw)| w > bw) {
            best = Some((i, w));
        }
    }
    best.map(|(i, _)| i)
}

/// `auto`'s choice of placement for compacting a whole stack: absorb into the largest layer
/// when that copies at most half of what a new layer would, else a new layer.
pub(crate) fn auto_placement(s: &StackStat) -> Placement {
    let total = s.live_blocks().unwrap_or_else(|| s.records());
    match largest(s, |_| true) {
        Some(i) => {
            let l = &s.layers[i];
            let kept = l.live.unwrap_or(l.records);
            if total.saturating_sub(kept).saturating_mul(2) <= total {
                Placement::Absorb(i)
            } else {
                Placement::NewLayer
            }
        }
        None => Placement::NewLayer,
    }
}

struct Relink;
impl Strategy for Relink {
    fn name(&self) -> &str {
        "relink"
    }
    fn plan(&self, _: &Situation) -> Vec<Move> {
        Vec::new()
    }
    fn measures(&self) -> bool {
        false
    }
}

struct IntoChild;
impl Strategy for IntoChild {
    fn name(&self) -> &str {
        "compact-into-child"
    }
    fn measures(&self) -> bool {
        false
    }
    fn plan(&self, s: &Situation) -> Vec<Move> {
        s.target
            .and_then(|t| s.stack(t))
            .and_then(|st| whole(st, Placement::NewLayer))
            .into_iter()
            .collect()
    }
}

struct IntoParent;
impl Strategy for IntoParent {
    fn name(&self) -> &str {
        "compact-into-parent"
    }
    fn plan(&self, s: &Situation) -> Vec<Move> {
        let Some(st) = s.target.and_then(|t| s.stack(t)) else {
            return Vec::new();
        };
        let Some(i) = largest(st, |l| l.from_deleted) else {
            return Vec::new();
        };
        whole(st, Placement::Absorb(i)).into_iter().collect()
    }
}

/// Threshold bounds: compact a stack deeper than this many sealed layers...
pub const THRESHOLD_DEPTH: usize = 4;
/// ...or whose sealed records are more than this fraction garbage.
pub const THRESHOLD_GARBAGE: f64 = 0.5;

struct Threshold;
impl Strategy for Threshold {
    fn name(&self) -> &str {
        "threshold"
    }
    fn plan(&self, s: &Situation) -> Vec<Move> {
        let Some(st) = s.target.and_then(|t| s.stack(t)) else {
            return Vec::new();
        };
        if st.sealed > THRESHOLD_DEPTH || st.garbage() > THRESHOLD_GARBAGE {
            whole(st, auto_placement(st)).into_iter().collect()
        } else {
            Vec::new()
        }
    }
}

/// `auto` relinks while the stack stays shallow and clean (up to this many sealed layers)...
pub const AUTO_DEPTH: usize = 2;
/// ...and less than this fraction garbage.
pub const AUTO_GARBAGE: f64 = 0.25;

struct Auto;
impl Strategy for Auto {
    fn name(&self) -> &str {
        "auto"
    }
    fn plan(&self, s: &Situation) -> Vec<Move> {
        let Some(st) = s.target.and_then(|t| s.stack(t)) else {
            return Vec::new();
        };
        if st.sealed <= AUTO_DEPTH && st.garbage() < AUTO_GARBAGE {
            return Vec::new();
        }
        whole(st, auto_placement(st)).into_iter().collect()
    }
}

/// The built-in strategy `kind`.
pub(crate) fn builtin(kind: StrategyKind) -> Arc<dyn Strategy> {
    match kind {
        StrategyKind::Relink => Arc::new(Relink),
        StrategyKind::CompactIntoChild => Arc::new(IntoChild),
        StrategyKind::CompactIntoParent => Arc::new(IntoParent),
        StrategyKind::Threshold => Arc::new(Threshold),
        StrategyKind::Auto => Arc::new(Auto),
    }
}

/// The moves that keep every lineage within the layer-file bound: for each path from a root
/// to a visible checkpoint or to Now, the excess (layers beyond one per node stack, and
/// beyond the active layer for Now) may be at most [`LINEAGE_SLACK`]; the deepest stacks of
/// a path over the bound are compacted first. `paths` lists each path's stacks.
pub(crate) fn maintenance_moves(s: &Situation, paths: &[Vec<StackRef>]) -> Vec<Move> {
    let excess = |st: &StackStat| match st.at {
        StackRef::Now => st.sealed,
        StackRef::Node(_) => st.sealed.saturating_sub(1),
    };
    let mut chosen: Vec<StackRef> = Vec::new();
    for path in paths {
        let mut stacks: Vec<&StackStat> = path.iter().filter_map(|&a| s.stack(a)).collect();
        let mut total: usize = stacks
            .iter()
            .filter(|st| !chosen.contains(&st.at))
            .map(|st| excess(st))
            .sum();
        stacks.sort_by_key(|st| std::cmp::Reverse(excess(st)));
        for st in stacks {
            if total <= LINEAGE_SLACK {
                break;
            }
            if chosen.contains(&st.at) || st.busy || st.sealed < 2 {
                continue;
            }
            total -= excess(st);
            chosen.push(st.at);
        }
    }
    chosen
        .into_iter()
        .filter_map(|a| s.stack(a))
        .filter_map(|st| whole(st, auto_placement(st)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stack(at: StackRef, live: &[(u64, u64)], sealed: usize) -> StackStat {
        StackStat {
            at,
            visible: true,
            layers: live
                .iter()
                .enumerate()
                .map(|(i, &(records, live))| LayerStat {
                    id: i as u64 + 10,
                    records,
                    live: Some(live),
                    allocated_bytes: records * 4096,
                    from_deleted: i == 0,
                })
                .collect(),
            sealed,
            busy: false,
        }
    }

    #[test]
    fn names_round_trip() {
        for k in StrategyKind::ALL {
            assert_eq!(k.to_string().parse::<StrategyKind>().unwrap(), k);
            assert_eq!(builtin(k).name(), k.name());
        }
        assert!("merge-harder".parse::<StrategyKind>().is_err());
    }

    #[test]
    fn auto_absorbs_into_a_dominant_layer_and_relinks_shallow_stacks() {
        let big = stack(StackRef::Now, &[(1000, 1000), (10, 10), (5, 5), (1, 1)], 3);
        assert_eq!(auto_placement(&big), Placement::Absorb(0));
        let even = stack(
            StackRef::Now,
            &[(100, 100), (100, 100), (100, 100), (1, 1)],
            3,
        );
        assert_eq!(auto_placement(&even), Placement::NewLayer);
        let s = Situation {
            deleted: "x".into(),
            target: Some(StackRef::Now),
            stacks: vec![stack(StackRef::Now, &[(100, 100), (1, 1)], 1)],
            visible_checkpoints: 0,
        };
        assert!(Auto.plan(&s).is_empty());
        let mut deep = s.clone();
        deep.stacks = vec![even];
        assert_eq!(Auto.plan(&deep).len(), 1);
        assert_eq!(deep.stacks[0].records(), 300);
    }

    #[test]
    fn maintenance_compacts_only_paths_over_the_bound() {
        let now = stack(StackRef::Now, &[(1, 1); 7], 6);
        let node = stack(StackRef::Node(1), &[(1, 1); 2], 2);
        let s = Situation {
            deleted: String::new(),
            target: None,
            stacks: vec![now, node],
            visible_checkpoints: 1,
        };
        let m = maintenance_moves(&s, &[vec![StackRef::Node(1), StackRef::Now]]);
        assert_eq!(m.len(), 1, "{m:?}");
        assert_eq!(m[0].stack, StackRef::Now);
        assert_eq!(m[0].len, 6);
        let m = maintenance_moves(&s, &[vec![StackRef::Node(1)]]);
        assert!(m.is_empty());
    }
}
