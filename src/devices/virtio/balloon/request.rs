//! What the guest controls on the balloon's queues: arrays of page frame numbers
//! (inflate, deflate), ranges of freed memory (free page reporting) and the tagged
//! statistics buffer. Pure functions of guest memory and descriptors, so unit tests and
//! fuzz targets drive them directly; nothing here panics on guest input, and every range
//! they return lies inside one guest RAM region.

use serde::{Deserialize, Serialize};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::devices::virtio::buffer::{gather_readable_chain, parse_writable_chain, ChainError};

/// Balloon pages are 4 KiB whatever the guest's page size (virtio 1.2, 5.5.6).
pub const PFN_SHIFT: u32 = 12;
pub const BALLOON_PAGE_SIZE: u64 = 1 << PFN_SHIFT;
/// The most page frame numbers one request may carry. Linux sends at most 256
/// (VIRTIO_BALLOON_ARRAY_PFNS_MAX); a larger buffer is refused rather than copied.
pub const MAX_PFNS: usize = 1024;
/// One statistic: a little-endian u16 tag and u64 value, packed.
const STAT_LEN: usize = 10;
/// The most statistics one buffer may carry (Linux 6.1 sends 10).
pub const MAX_STATS: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error("the buffer holds {0} bytes, not a whole number of page frame numbers")]
    Ragged(usize),
    #[error("page frame {0:#x} is not guest RAM")]
    PfnOutside(u32),
}

/// A run of whole balloon pages of guest RAM, inside one memory region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestRange {
    pub addr: GuestAddress,
    pub len: u64,
}

impl GuestRange {
    pub fn pages(&self) -> u64 {
        self.len >> PFN_SHIFT
    }
}

/// The start of the RAM region holding all of `[addr, addr + len)`, or `None` when some
/// of it is not guest RAM (a hole, past the end, or across two regions).
fn region_of<M: GuestMemoryBackend + ?Sized>(mem: &M, addr: GuestAddress, len: u64) -> Option<u64> {
    let region = mem.find_region(addr)?;
    let offset = addr.checked_offset_from(region.start_addr())?;
    let end = offset.checked_add(len)?;
    (end <= region.len()).then(|| region.start_addr().raw_value())
}

/// Reads an inflate or deflate request: a chain of device-readable descriptors holding
/// little-endian 32-bit page frame numbers, at most [`MAX_PFNS`].
pub fn read_pfns<M, I>(mem: &M, descriptors: I) -> Result<Vec<u32>, RequestError>
where
    M: GuestMemoryBackend + ?Sized,
    I: IntoIterator<Item = Descriptor>,
{
    let mut bytes = [0u8; MAX_PFNS * 4];
    let len = gather_readable_chain(mem, descriptors, &mut bytes)?;
    if len % 4 != 0 {
        return Err(RequestError::Ragged(len));
    }
    Ok(bytes[..len]
        .chunks_exact(4)
        .map(|pfn| u32::from_le_bytes([pfn[0], pfn[1], pfn[2], pfn[3]]))
        .collect())
}

/// The guest RAM that `pfns` name, as runs of adjacent pages in the order given. Every
/// page must be guest RAM, or nothing is: a driver that names a page outside its memory
/// is broken or hostile, and the request is refused whole.
pub fn pfn_ranges<M: GuestMemoryBackend + ?Sized>(
    mem: &M,
    pfns: &[u32],
) -> Result<Vec<GuestRange>, RequestError> {
    let mut ranges: Vec<(GuestRange, u64)> = Vec::new();
    for &pfn in pfns {
        let addr = GuestAddress(u64::from(pfn) << PFN_SHIFT);
        let region =
            region_of(mem, addr, BALLOON_PAGE_SIZE).ok_or(RequestError::PfnOutside(pfn))?;
        match ranges.last_mut() {
            Some((last, last_region))
                if *last_region == region
                    && last.addr.raw_value() + last.len == addr.raw_value() =>
            {
                last.len += BALLOON_PAGE_SIZE;
            }
            _ => ranges.push((
                GuestRange {
                    addr,
                    len: BALLOON_PAGE_SIZE,
                },
                region,
            )),
        }
    }
    Ok(ranges.into_iter().map(|(range, _)| range).collect())
}

/// Reads a free page report: a chain of device-writable descriptors, each one range of
/// memory the guest freed. Each range is trimmed inward to whole balloon pages; a range
/// that is not guest RAM makes the whole report unusable (nothing is dropped).
pub fn reported_ranges<M, I>(mem: &M, descriptors: I) -> Result<Vec<GuestRange>, RequestError>
where
    M: GuestMemoryBackend + ?Sized,
    I: IntoIterator<Item = Descriptor>,
{
    let chain = parse_writable_chain(mem, descriptors, 0)?;
    let mut ranges = Vec::with_capacity(chain.segments().len());
    for &(addr, len) in chain.segments() {
        let start = addr.raw_value();
        let end = start
            .checked_add(u64::from(len))
            .ok_or(ChainError::BadAddress)?;
        let first = start.next_multiple_of(BALLOON_PAGE_SIZE);
        let last = end & !(BALLOON_PAGE_SIZE - 1);
        if last <= first {
            continue;
        }
        let range = GuestRange {
            addr: GuestAddress(first),
            len: last - first,
        };
        region_of(mem, range.addr, range.len).ok_or(ChainError::BadAddress)?;
        ranges.push(range);
    }
    Ok(ranges)
}

/// The guest's memory statistics, named as Firecracker's `GET /balloon/statistics` names
/// them; a statistic the guest did not send is absent. Sizes are bytes, faults counts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonStats {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_in: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_out: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub major_faults: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minor_faults: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_memory: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_memory: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available_memory: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_caches: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugetlb_allocations: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugetlb_failures: Option<u64>,
}

/// The statistic tags this device knows (VIRTIO_BALLOON_S_SWAPIN .. S_HTLB_PGFAIL).
const KNOWN_TAGS: u16 = 10;

impl BalloonStats {
    /// The field of statistic `tag`.
    fn slot(&mut self, tag: u16) -> Option<&mut Option<u64>> {
        Some(match tag {
            0 => &mut self.swap_in,
            1 => &mut self.swap_out,
            2 => &mut self.major_faults,
            3 => &mut self.minor_faults,
            4 => &mut self.free_memory,
            5 => &mut self.total_memory,
            6 => &mut self.available_memory,
            7 => &mut self.disk_caches,
            8 => &mut self.hugetlb_allocations,
            9 => &mut self.hugetlb_failures,
            _ => return None,
        })
    }

    /// Parses the tagged statistics (VIRTIO_BALLOON_S_*). Unknown tags are skipped (a
    /// newer driver sends more); a trailing partial entry is ignored; a tag sent twice
    /// keeps its last value.
    pub fn parse(bytes: &[u8]) -> Self {
        let mut stats = Self::default();
        for entry in bytes.chunks_exact(STAT_LEN) {
            let tag = u16::from_le_bytes([entry[0], entry[1]]);
            let mut value = [0u8; 8];
            value.copy_from_slice(&entry[2..]);
            match stats.slot(tag) {
                Some(slot) => *slot = Some(u64::from_le_bytes(value)),
                None => log::debug!("virtio-balloon: unknown statistic tag {tag}"),
            }
        }
        stats
    }

    /// The statistics present, as (tag, value): the form a snapshot keeps, whose encoding
    /// cannot skip absent fields.
    pub fn tagged(&self) -> Vec<(u16, u64)> {
        let mut copy = self.clone();
        (0..KNOWN_TAGS)
            .filter_map(|tag| copy.slot(tag).and_then(|slot| slot.map(|v| (tag, v))))
            .collect()
    }

    /// The statistics [`Self::tagged`] listed; unknown tags are skipped.
    pub fn from_tagged(tagged: &[(u16, u64)]) -> Self {
        let mut stats = Self::default();
        for &(tag, value) in tagged {
            if let Some(slot) = stats.slot(tag) {
                *slot = Some(value);
            }
        }
        stats
    }
}

/// Reads the statistics buffer the driver posted on the stats queue.
pub fn read_stats<M, I>(mem: &M, descriptors: I) -> Result<BalloonStats, RequestError>
where
    M: GuestMemoryBackend + ?Sized,
    I: IntoIterator<Item = Descriptor>,
{
    let mut bytes = [0u8; MAX_STATS * STAT_LEN];
    let len = gather_readable_chain(mem, descriptors, &mut bytes)?;
    Ok(BalloonStats::parse(&bytes[..len]))
}

#[cfg(test)]
mod tests {
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use vm_memory::{Bytes, GuestMemoryMmap};

    use super::*;

    const WRITE: u16 = VRING_DESC_F_WRITE as u16;
    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const DATA: u64 = 0x1000;

    /// 1 MiB of RAM at 0, a hole, 1 MiB at 4 MiB.
    fn memory() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 1 << 20),
            (GuestAddress(4 << 20), 1 << 20),
        ])
        .unwrap()
    }

    fn write_pfns(mem: &GuestMemoryMmap<()>, pfns: &[u32]) -> Descriptor {
        let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        mem.write_slice(&bytes, GuestAddress(DATA)).unwrap();
        Descriptor::new(DATA, bytes.len() as u32, 0, 0)
    }

    fn range(addr: u64, pages: u64) -> GuestRange {
        GuestRange {
            addr: GuestAddress(addr),
            len: pages << PFN_SHIFT,
        }
    }

    #[test]
    fn pfns_become_runs_of_adjacent_pages() {
        let mem = memory();
        let pfns = [0x10, 0x11, 0x12, 0x20, 0x1f, 0xff, 0x400, 0x401];
        let desc = write_pfns(&mem, &pfns);
        assert_eq!(read_pfns(&mem, [desc]).unwrap(), pfns);
        let ranges = pfn_ranges(&mem, &pfns).unwrap();
        assert_eq!(
            ranges,
            [
                range(0x10_000, 3),
                range(0x20_000, 1),
                range(0x1f_000, 1),
                // The last page of the low region and the first of the high one are not
                // adjacent in guest RAM.
                range(0xff_000, 1),
                range(0x400_000, 2),
            ]
        );
        assert_eq!(ranges.iter().map(GuestRange::pages).sum::<u64>(), 8);
        assert!(pfn_ranges(&mem, &[]).unwrap().is_empty());
    }

    /// A hostile driver naming pages in the hole, past the end of RAM or at the top of
    /// the 32-bit space gets nothing dropped.
    #[test]
    fn a_page_outside_guest_ram_refuses_the_request() {
        let mem = memory();
        for bad in [0x100, 0x3ff, 0x500, u32::MAX] {
            assert_eq!(
                pfn_ranges(&mem, &[0x10, bad]),
                Err(RequestError::PfnOutside(bad)),
                "{bad:#x}"
            );
        }
    }

    #[test]
    fn malformed_pfn_buffers_are_refused() {
        let mem = memory();
        mem.write_slice(&[1, 2, 3, 4, 5, 6], GuestAddress(DATA))
            .unwrap();
        let ragged = Descriptor::new(DATA, 6, 0, 0);
        assert_eq!(read_pfns(&mem, [ragged]), Err(RequestError::Ragged(6)));
        let writable = Descriptor::new(DATA, 4, WRITE, 0);
        assert!(matches!(
            read_pfns(&mem, [writable]),
            Err(RequestError::Chain(ChainError::WritableDescriptor))
        ));
        let huge = Descriptor::new(DATA, (MAX_PFNS as u32 + 1) * 4, 0, 0);
        assert!(matches!(
            read_pfns(&mem, [huge]),
            Err(RequestError::Chain(ChainError::TooLong))
        ));
        let outside = Descriptor::new(0x200_000, 4, 0, 0);
        assert!(matches!(
            read_pfns(&mem, [outside]),
            Err(RequestError::Chain(ChainError::BadAddress))
        ));
        let broken = Descriptor::new(DATA, 4, NEXT, 7);
        assert!(matches!(
            read_pfns(&mem, [broken]),
            Err(RequestError::Chain(ChainError::BrokenChain))
        ));
    }

    #[test]
    fn reported_ranges_are_trimmed_to_whole_pages_and_checked() {
        let mem = memory();
        let report = [
            Descriptor::new(0x8_0000, 0x2_0000, WRITE | NEXT, 1),
            // Not page-aligned: trimmed inward.
            Descriptor::new(0x40_0800, 0x2800, WRITE | NEXT, 2),
            // Less than a page once trimmed: skipped.
            Descriptor::new(0x40_8800, 0x1000, WRITE, 0),
        ];
        assert_eq!(
            reported_ranges(&mem, report).unwrap(),
            [range(0x8_0000, 0x20), range(0x40_1000, 2)]
        );
        // Into the hole, or reaching past the end of RAM: the report is refused.
        for bad in [
            Descriptor::new(0xf_f000, 0x2000, WRITE, 0),
            Descriptor::new(0x4f_f000, 0x2000, WRITE, 0),
            Descriptor::new(u64::MAX - 0xfff, 0x1000, WRITE, 0),
        ] {
            assert!(reported_ranges(&mem, [bad]).is_err(), "{bad:?}");
        }
        // The device writes nothing to a report, but a readable one is still malformed.
        assert!(reported_ranges(&mem, [Descriptor::new(0x8_0000, 0x1000, 0, 0)]).is_err());
    }

    #[test]
    fn statistics_are_parsed_by_tag() {
        let mem = memory();
        let mut bytes = Vec::new();
        for (tag, value) in [
            (0u16, 1u64),
            (3, 77),
            (4, 100 << 20),
            (5, 512 << 20),
            (6, 300 << 20),
            (9, 2),
            (42, 5),
        ] {
            bytes.extend_from_slice(&tag.to_le_bytes());
            bytes.extend_from_slice(&value.to_le_bytes());
        }
        // A trailing partial entry.
        bytes.extend_from_slice(&[7, 0, 1]);
        mem.write_slice(&bytes, GuestAddress(DATA)).unwrap();
        let stats = read_stats(&mem, [Descriptor::new(DATA, bytes.len() as u32, 0, 0)]).unwrap();
        assert_eq!(
            stats,
            BalloonStats {
                swap_in: Some(1),
                minor_faults: Some(77),
                free_memory: Some(100 << 20),
                total_memory: Some(512 << 20),
                available_memory: Some(300 << 20),
                hugetlb_failures: Some(2),
                ..BalloonStats::default()
            }
        );
        let json = serde_json::to_value(&stats).unwrap();
        assert_eq!(json["minor_faults"], 77);
        assert!(json.get("swap_out").is_none());
        assert_eq!(BalloonStats::parse(&[]), BalloonStats::default());
        assert_eq!(
            stats.tagged(),
            [
                (0, 1),
                (3, 77),
                (4, 100 << 20),
                (5, 512 << 20),
                (6, 300 << 20),
                (9, 2)
            ]
        );
        assert_eq!(BalloonStats::from_tagged(&stats.tagged()), stats);
        let too_long = Descriptor::new(DATA, (MAX_STATS * STAT_LEN + 1) as u32, 0, 0);
        assert!(read_stats(&mem, [too_long]).is_err());
    }
}
