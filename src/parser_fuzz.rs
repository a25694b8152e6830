//! Fuzzing entry points: rewind's parsers of untrusted input, each taking
//! arbitrary bytes. Each must return without panicking, hanging or
//! allocating without bound; the fuzz targets in `fuzz/` and the regression
//! and bounded random runs in `tests/fuzz_parsers.rs` call these, so a crash
//! found once stays fixed.
//!
//! Where a checksum or length would stop every mutated input at the door,
//! the harness repairs it (saying so below), so the fuzzer reaches the
//! decoder behind it; the checks themselves get inputs left as they are too.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use crate::agent::{parse_line, Engine, Event, OutputMode, MAX_AGENT_LINE};
use crate::devices::bus::BusDevice;
use crate::devices::virtio::backend::BlockBackend;
use crate::devices::virtio::block::Block;
use crate::devices::virtio::mmio::MmioTransport;
use crate::snapshot::format::{crc64_xz, decode_state, encode_state};
use crate::vmm::MachineState;

/// A fuzz target: takes any bytes.
pub type Target = fn(&[u8]);

/// The targets, by the names `fuzz/` and the script use.
pub const TARGETS: &[(&str, Target)] = &[
    ("http", http),
    ("agent", agent),
    ("virtio_blk", virtio_blk),
    ("assist", assist),
    ("bundle", bundle),
    ("memory_delta", memory_delta),
];

/// The control socket's request parser (and the client's response parser).
pub fn http(data: &[u8]) {
    use crate::control::http::{check_request_target, read_request, read_response};
    if let Ok(req) = read_request(&mut &data[..]) {
        let _ = check_request_target(&req.method, &req.path);
        let _ = req.header("content-length");
    }
    let _ = read_response(&mut &data[..]);
}

/// The agent protocol: single lines, and the engine fed the bytes in
/// pieces whose sizes the input picks. Whatever came in, a command still
/// ends by its deadline and the engine holds at most one line.
pub fn agent(data: &[u8]) {
    for line in data.split(|&b| b == b'\n') {
        let _ = parse_line(&String::from_utf8_lossy(line));
    }
    let mode = match data.first() {
        Some(b) if b & 1 == 1 => OutputMode::Stream,
        _ => OutputMode::Collect,
    };
    let mut e = Engine::new(1);
    let id = e.start("true", Duration::from_secs(60), mode);
    let mut done = false;
    let mut rest = data;
    while let Some((&n, tail)) = rest.split_first() {
        let (piece, tail) = tail.split_at((usize::from(n) + 1).min(tail.len()));
        for ev in e.receive(piece) {
            done |= matches!(ev, Event::Done(got, _) if got == id);
        }
        assert!(
            e.buffered() <= MAX_AGENT_LINE + 256,
            "agent engine buffers too much"
        );
        rest = tail;
    }
    let late = Instant::now() + Duration::from_secs(61);
    for ev in e.expire(late) {
        done |= matches!(ev, Event::Done(got, _) if got == id);
    }
    assert!(done, "a command outlived its deadline");
    assert!(e.is_idle());
}

/// Disk contents in memory, for the block device under fuzzing.
struct MemDisk(Vec<u8>);

impl BlockBackend for MemDisk {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let at = offset as usize;
        buf.copy_from_slice(&self.0[at..at + buf.len()]);
        Ok(())
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let at = offset as usize;
        self.0[at..at + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    fn id(&self) -> String {
        "fuzz".into()
    }
}

const VQ_DESC: u64 = 0x1000;
const VQ_AVAIL: u64 = 0x2000;
const VQ_USED: u64 = 0x3000;

/// virtio-blk request parsing behind a real virtio-mmio transport: the
/// input's first 4 bytes are the driver's feature bits 0-31 (indirect
/// descriptors, event index), the rest is guest memory from the descriptor
/// table on (table, avail ring, used ring, headers and buffers), and the
/// queue is kicked twice (the second sees whatever the first left).
pub fn virtio_blk(data: &[u8]) {
    let mem = crate::memory::create_guest_memory(1 << 20).expect("1 MiB of guest memory");
    let disk = Box::new(MemDisk(vec![0; 64 << 10]));
    let mut dev = MmioTransport::new(mem.clone(), Block::new(disk)).expect("block device");
    let (features, ram) = data.split_at(data.len().min(4));
    let mut f = [0u8; 4];
    f[..features.len()].copy_from_slice(features);
    let wr = |dev: &mut MmioTransport<Block>, off: u64, v: u32| dev.write(off, &v.to_le_bytes());
    wr(&mut dev, 0x70, 1);
    wr(&mut dev, 0x70, 3);
    wr(&mut dev, 0x24, 1);
    wr(&mut dev, 0x20, 1); // VIRTIO_F_VERSION_1
    wr(&mut dev, 0x24, 0);
    wr(&mut dev, 0x20, u32::from_le_bytes(f));
    wr(&mut dev, 0x70, 0xb);
    wr(&mut dev, 0x30, 0);
    wr(&mut dev, 0x38, 16);
    wr(&mut dev, 0x80, VQ_DESC as u32);
    wr(&mut dev, 0x90, VQ_AVAIL as u32);
    wr(&mut dev, 0xa0, VQ_USED as u32);
    wr(&mut dev, 0x44, 1);
    wr(&mut dev, 0x70, 0xf);
    let ram = &ram[..ram.len().min((1 << 20) - VQ_DESC as usize)];
    mem.write_slice(ram, GuestAddress(VQ_DESC))
        .expect("fits in guest memory");
    wr(&mut dev, 0x50, 0);
    wr(&mut dev, 0x50, 0);
}

/// The PVM emulation assist's decoder of `ldmxcsr`/`stmxcsr` (the only
/// instructions it decodes beyond one opcode byte) and its operand address.
pub fn assist(data: &[u8]) {
    use crate::kvm::assist::mxcsr;
    let Some(d) = mxcsr::decode(data) else {
        return;
    };
    assert!(d.len <= data.len(), "decoded past the bytes it was given");
    let regs = kvm_bindings::kvm_regs {
        rip: 0xffff_ffff_ffff_fff0,
        rsp: u64::MAX,
        rbp: 1 << 63,
        rax: 0x1234,
        ..Default::default()
    };
    let _ = mxcsr::address(&d, &regs, u64::MAX);
}

/// A temporary snapshot directory per process, reused by every input.
fn bundle_dir() -> &'static Path {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("rewind-fuzz-bundle-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("temporary directory");
        d
    })
}

fn take<'a>(data: &mut &'a [u8]) -> &'a [u8] {
    let (len, rest) = data.split_at(data.len().min(4));
    let mut l = [0u8; 4];
    l[..len.len()].copy_from_slice(len);
    let n = (u32::from_le_bytes(l) as usize).min(rest.len());
    let (part, rest) = rest.split_at(n);
    *data = rest;
    part
}

/// The bundle reader (`snapshot::ops::validate`, what revert and restore
/// read a snapshot through, memory layers included): input = flags byte,
/// then length-prefixed manifest.json and state.bin bodies, then memory.bin's
/// length. Flag bit 0 wraps the state body in a correct header and makes the
/// manifest's state_bytes and state_crc64 agree with it, so mutations reach
/// bincode and the checks after it; bit 1 leaves memory.bin out.
pub fn bundle(mut data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    data = rest;
    let manifest = take(&mut data);
    let state = take(&mut data);
    let mut mem_len = [0u8; 8];
    let n = data.len().min(8);
    mem_len[..n].copy_from_slice(&data[..n]);
    // Sparse, so any length costs nothing; capped below the file size limit.
    let mem_len = u64::from_le_bytes(mem_len) % (1 << 40);

    let dir = bundle_dir();
    let mut state_file = state.to_vec();
    let mut manifest_file = manifest.to_vec();
    if flags & 1 == 1 {
        state_file = wrap_state(state);
        if let Ok(serde_json::Value::Object(mut m)) = serde_json::from_slice(manifest) {
            m.insert("state_bytes".into(), (state_file.len() as u64).into());
            m.insert("state_crc64".into(), crc64_xz(&state_file).into());
            manifest_file = serde_json::to_vec(&m).expect("JSON");
        }
    }
    let write = |name: &str, bytes: &[u8]| {
        let mut f = std::fs::File::create(dir.join(name)).expect("bundle file");
        f.write_all(bytes).expect("bundle file");
    };
    write("manifest.json", &manifest_file);
    write("state.bin", &state_file);
    let memory = dir.join("memory.bin");
    if flags & 2 == 0 {
        let f = std::fs::File::create(&memory).expect("memory file");
        f.set_len(mem_len).expect("sparse memory file");
    } else {
        let _ = std::fs::remove_file(&memory);
    }
    let _ = decode_state::<MachineState>(&state_file);
    // This host offers what the manifest says the guest needs, so inputs
    // get past the host check to the vCPU states' own CPUID and TSC checks.
    let offered = serde_json::from_slice::<crate::snapshot::state::Manifest>(&manifest_file)
        .map(|m| m.host.cpu_features)
        .unwrap_or_default();
    let target = crate::snapshot::ops::Target {
        host_kind: "pvm".into(),
        offered,
        tsc_khz: None,
        can_scale_tsc: true,
        running: None,
    };
    let _ = crate::snapshot::ops::validate::<MachineState>(dir, &target);
}

/// An incremental memory layer (`memory.delta`) read the way restore reads
/// it: through `snapshot::chain::open` onto a 1 MiB full parent, then
/// mapped as a restore does and applied as a revert does. Input = flags byte, then the file. Flag bit 0
/// makes the header's CRC-64 agree with the header and index, so mutations
/// reach the checks behind it.
pub fn memory_delta(data: &[u8]) {
    const FIELDS: usize = 96;
    const MEM: u64 = 1 << 20;
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let mut file = rest.to_vec();
    if flags & 1 == 1 && file.len() >= FIELDS + 8 {
        let count = u64::from_le_bytes(file[FIELDS - 8..FIELDS].try_into().unwrap_or([0; 8]));
        let index_end = 4096usize.saturating_add((count.min(1 << 20) as usize) * 8);
        let mut checked = file[..FIELDS].to_vec();
        if let Some(index) = file.get(4096..index_end) {
            checked.extend_from_slice(index);
        }
        file[FIELDS..FIELDS + 8].copy_from_slice(&crc64_xz(&checked).to_le_bytes());
    }
    let root = bundle_dir().join("delta");
    let (parent, child) = (root.join("p"), root.join("c"));
    std::fs::create_dir_all(&parent).expect("parent directory");
    std::fs::create_dir_all(&child).expect("child directory");
    let base = std::fs::File::create(parent.join("memory.bin")).expect("full layer");
    base.set_len(MEM).expect("sparse full layer");
    let mut f = std::fs::File::create(child.join("memory.delta")).expect("delta file");
    f.write_all(&file).expect("delta file");
    drop(f);
    if let Ok(chain) = crate::snapshot::chain::open(&child, MEM) {
        if let Ok(mem) = crate::snapshot::mapping::map(&chain, MEM) {
            let _ = chain.data_bitmap(&mem);
        }
        let mem = crate::memory::create_guest_memory(MEM).expect("guest memory");
        let _ = chain.apply_layers(&mem);
    }
}

/// A state.bin image around `body`, header and CRC correct.
fn wrap_state(body: &[u8]) -> Vec<u8> {
    // encode_state of raw bytes would add bincode's own framing: build the
    // header by hand from an empty encoding's (magic, version, flags).
    let empty = encode_state(&()).expect("empty state");
    let mut out = empty[..16].to_vec();
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc64_xz(body).to_le_bytes());
    out.extend_from_slice(body);
    out
}
