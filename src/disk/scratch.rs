//! An in-memory layer over a VM's writable overlay, for a fuzzer: while it
//! is on, the guest's writes land here (by 512-byte sector) and reads see
//! them on top of the overlay, so a reset drops every disk write since the
//! snapshot by emptying a map, and nothing reaches a file.

use std::collections::HashMap;

pub const SECTOR: u64 = 512;

#[derive(Debug, Default)]
pub struct ScratchLayer {
    sectors: HashMap<u64, Box<[u8; SECTOR as usize]>>,
}

impl ScratchLayer {
    /// Overwrites `buf` (read from the layer below at `offset`) with every
    /// sector this layer holds in that range.
    pub fn patch_read(&self, buf: &mut [u8], offset: u64) {
        if self.sectors.is_empty() {
            return;
        }
        let end = offset + buf.len() as u64;
        let mut sector = offset / SECTOR;
        while sector * SECTOR < end {
            if let Some(data) = self.sectors.get(&sector) {
                let s_start = sector * SECTOR;
                let from = s_start.max(offset);
                let to = (s_start + SECTOR).min(end);
                buf[(from - offset) as usize..(to - offset) as usize]
                    .copy_from_slice(&data[(from - s_start) as usize..(to - s_start) as usize]);
            }
            sector += 1;
        }
    }

    /// Stores `buf` at `offset`. `below` reads a whole sector as it is now
    /// (layer below, patched) for a write that covers only part of one.
    pub fn write(
        &mut self,
        buf: &[u8],
        offset: u64,
        mut below: impl FnMut(u64, &mut [u8; SECTOR as usize]),
    ) {
        let end = offset + buf.len() as u64;
        let mut sector = offset / SECTOR;
        while sector * SECTOR < end {
            let s_start = sector * SECTOR;
            let from = s_start.max(offset);
            let to = (s_start + SECTOR).min(end);
            let whole = from == s_start && to == s_start + SECTOR;
            let entry = self.sectors.entry(sector).or_insert_with(|| {
                let mut data = Box::new([0u8; SECTOR as usize]);
                if !whole {
                    below(sector, &mut data);
                }
                data
            });
            entry[(from - s_start) as usize..(to - s_start) as usize]
                .copy_from_slice(&buf[(from - offset) as usize..(to - offset) as usize]);
            sector += 1;
        }
    }

    /// Every sector held, in no particular order.
    pub fn sectors(&self) -> impl Iterator<Item = (u64, &[u8; SECTOR as usize])> {
        self.sectors.iter().map(|(s, d)| (*s, &**d))
    }

    pub fn clear(&mut self) {
        self.sectors.clear();
    }

    pub fn bytes(&self) -> u64 {
        self.sectors.len() as u64 * SECTOR
    }
}
