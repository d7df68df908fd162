//! Building a view (its layers and merged index) from a lineage of layer ids.

use std::path::Path;
use std::sync::Arc;

use crate::base::BaseImage;
use crate::disk::CacheMode;
use crate::format::{RecordKind, ZERO_BLOCK};
use crate::index::{Index, Loc};
use crate::layer::LayerFiles;
use crate::volume::{ActiveLayer, ViewState, Volume};
use crate::{Error, Result, BLOCK_SIZE};

/// What every view of one disk shares.
#[derive(Clone, Copy)]
pub(crate) struct DiskFiles<'a> {
    pub dir: &'a Path,
    pub uuid: u128,
    pub size: u64,
    pub cache: CacheMode,
}

/// Opens `layers` (oldest first), replays their logs into one index, and wraps them in a
/// volume. With `writable`, the last layer becomes the active layer (a torn log tail is cut
/// off) and layers from `own_from` on are Now's own. `tail` says whether the last layer is
/// Now's active layer, the only one whose log may end in a torn record: in any other layer
/// a torn tail is damage.
pub(crate) fn build_view(
    disk: DiskFiles<'_>,
    layers: &[u64],
    own_from: usize,
    writable: bool,
    tail: Tail,
    base: Option<Arc<BaseImage>>,
) -> Result<Volume> {
    Ok(Volume::new(
        disk.size,
        !writable,
        base,
        build_state(disk, layers, own_from, writable, tail)?,
    ))
}

/// Whether the last layer of a lineage is the active layer (which may have a torn tail).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Tail {
    /// The last layer is Now's active layer.
    Active,
    /// Every layer is sealed (a checkpoint's lineage).
    Sealed,
}

/// As [`build_view`], the state only (to swap into an existing volume).
pub(crate) fn build_state(
    disk: DiskFiles<'_>,
    layers: &[u64],
    own_from: usize,
    writable: bool,
    tail: Tail,
) -> Result<ViewState> {
    let DiskFiles {
        dir,
        uuid,
        size,
        cache,
    } = disk;
    if layers.len() > usize::from(u16::MAX) {
        return Err(Error::Invalid(format!(
            "lineage of {} layers exceeds 65535",
            layers.len()
        )));
    }
    let blocks_in_disk = size.div_ceil(BLOCK_SIZE);
    let mut index = Index::default();
    let mut files = Vec::with_capacity(layers.len());
    let mut active = None;
    let mut damaged_upto = None;
    for (ordinal, &id) in layers.iter().enumerate() {
        let last = ordinal + 1 == layers.len();
        let lf = Arc::new(LayerFiles::open(dir, uuid, id, cache, writable && last)?);
        let scan = lf.scan_log(blocks_in_disk)?;
        // The lineage is at most 65535 layers (checked above).
        let ord = ordinal as u16;
        for (off, why) in &scan.damaged {
            tracing::warn!("layer {id}: log record at byte {off}: {why} (run `strata disk check`)");
            damaged_upto = Some(ord);
        }
        for (off, why) in &scan.ignored {
            tracing::warn!("layer {id}: log record at byte {off} ignored: {why}");
        }
        let may_tear = last && tail == Tail::Active;
        if scan.torn_bytes > 0 && !may_tear {
            tracing::warn!(
                "layer {id} is sealed but its log ends in {} bytes that hold no valid record (run `strata disk check`)",
                scan.torn_bytes
            );
            damaged_upto = Some(ord);
        }
        let mut next_block: u64 = 0;
        for r in &scan.records {
            let loc = match r.kind {
                RecordKind::Data => {
                    next_block = next_block.max(r.data_block.saturating_add(1));
                    Loc {
                        ordinal: ord,
                        data_block: r.data_block,
                        crc: r.crc,
                    }
                }
                RecordKind::Zero => Loc {
                    ordinal: ord,
                    data_block: ZERO_BLOCK,
                    crc: 0,
                },
            };
            index.insert(r.disk_block, loc);
        }
        if writable && last {
            if scan.torn_bytes > 0 {
                tracing::info!(
                    "layer {id}: dropping a torn log tail of {} bytes",
                    scan.torn_bytes
                );
            }
            let a = Arc::new(ActiveLayer::new(lf.clone(), next_block, scan.valid_len)?);
            a.rebuild_space(&index, ord, !scan.damaged.is_empty())?;
            active = Some(a);
        }
        files.push(lf);
    }
    Ok(ViewState {
        layers: files,
        index,
        active,
        own_from,
        damaged_upto,
        unreadable: None,
    })
}
