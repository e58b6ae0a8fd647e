//! Real clients against real processes: nbdinfo, qemu-io, nbdcopy, fio's nbd engine with
//! verification, and ext4 on nbdfuse + loop surviving a cluster restart.

mod support;

use std::process::Command;

use support::*;

#[test]
fn nbdinfo_lists_the_export_with_size_and_flags() {
    let _g = serial();
    require_tool("nbdinfo");
    let c = LocalCluster::start("parallel", "256M");
    let out = run_ok(Command::new("nbdinfo").arg(c.uri()));
    assert!(out.contains("export-size: 268435456"), "{out}");
    for flag in ["can_flush: true", "can_fua: true", "can_multi_conn: true", "can_trim: true", "can_zero: true"] {
        assert!(out.contains(flag), "missing {flag}: {out}");
    }
    assert!(out.contains("block_size_minimum: 512") && out.contains("block_size_maximum: 33554432"), "{out}");
    let list = run_ok(Command::new("nbdinfo").arg("--list").arg(format!("nbd://127.0.0.1:{}", c.port)));
    assert!(list.contains("export=\"vol0\""), "{list}");
}

#[test]
fn qemu_io_pattern_writes_and_reads_across_chunks() {
    let _g = serial();
    require_tool("qemu-io");
    let c = LocalCluster::start("parallel", "256M");
    let chunk = 64u64 << 20;
    let cross = chunk - 8192; // a write straddling chunks 0 and 1
    let script = [
        "write -P 0xa5 0 1M".to_string(),
        format!("write -P 0x3c {cross} 16k"),
        format!("write -P 0x77 {} 512", 5 * 4096 + 512),
        format!("write -z {} 8k", 100 << 20),
        "read -P 0xa5 0 20992".to_string(),
        format!("read -P 0x77 {} 512", 5 * 4096 + 512),
        format!("read -P 0xa5 {} 3584", 5 * 4096 + 1024),
        format!("read -P 0x3c {cross} 16k"),
        format!("read -P 0 {} 8k", 100 << 20),
        format!("read -P 0 {} 4k", 200 << 20),
    ];
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for s in &script {
        cmd.arg("-c").arg(s);
    }
    cmd.arg(c.uri());
    let out = run_ok(&mut cmd);
    assert!(!out.contains("verification failed"), "{out}");
    assert_eq!(out.matches("read ").count(), 6, "{out}");
}

#[test]
fn nbdcopy_image_in_and_out_is_identical() {
    let _g = serial();
    require_tool("nbdcopy");
    let c = LocalCluster::start("parallel", "128M");
    let work = tempfile::tempdir().unwrap();
    let input = work.path().join("in.img");
    let output = work.path().join("out.img");
    // 128 MiB of random data, except a zero hole in the middle.
    let mut data = vec![0u8; 128 << 20];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for (k, chunk) in data.chunks_mut(8).enumerate() {
        if (40 << 20..48 << 20).contains(&(k * 8)) {
            continue;
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    std::fs::write(&input, &data).unwrap();
    run_ok(Command::new("nbdcopy").arg(&input).arg(c.uri()));
    run_ok(Command::new("nbdcopy").arg(c.uri()).arg(&output));
    let back = std::fs::read(&output).unwrap();
    assert_eq!(back.len(), data.len());
    assert!(back == data, "image read back differs from the image written");
}

#[test]
fn fio_verify_crc32c_iodepth32_four_connections() {
    let _g = serial();
    require_tool("fio");
    let c = LocalCluster::start("parallel", "256M");
    let out = run_ok(&mut fio_verify(&c.uri(), 32, 4, 16, 64));
    let job = fio_job(&out);
    assert_eq!(job["error"], 0, "{out}");
    // Every byte written was read back and verified.
    assert_eq!(job["write"]["io_bytes"].as_u64(), Some(4 * (16 << 20)), "{job}");
    assert_eq!(job["read"]["io_bytes"].as_u64(), Some(4 * (16 << 20)), "{job}");
}

fn sh(script: &str) -> String {
    run_ok(Command::new("sh").arg("-ec").arg(script))
}

/// nbdfuse exposes the export as a file; a loop device over it (direct I/O) carries ext4.
struct Mounted {
    fuse_dir: std::path::PathBuf,
    mnt: std::path::PathBuf,
    loopdev: String,
    nbdfuse: std::process::Child,
}

fn mount(uri: &str, work: &std::path::Path, mkfs: bool) -> Mounted {
    let fuse_dir = work.join("fuse");
    let mnt = work.join("mnt");
    std::fs::create_dir_all(&fuse_dir).unwrap();
    std::fs::create_dir_all(&mnt).unwrap();
    let nbdfuse = Command::new("nbdfuse").arg(fuse_dir.join("disk")).arg(uri).spawn().expect("nbdfuse");
    let disk = fuse_dir.join("disk");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::fs::metadata(&disk).map(|m| m.len()).unwrap_or(0) == 0 {
        assert!(std::time::Instant::now() < deadline, "nbdfuse did not expose the disk");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let loopdev = sh(&format!("losetup --direct-io=on --show -f {}", disk.display())).trim().to_string();
    if mkfs {
        sh(&format!("mkfs.ext4 -q -F {loopdev}"));
    }
    sh(&format!("mount {loopdev} {}", mnt.display()));
    Mounted { fuse_dir, mnt, loopdev, nbdfuse }
}

fn unmount(mut m: Mounted) {
    sh(&format!("umount {}", m.mnt.display()));
    sh(&format!("losetup -d {}", m.loopdev));
    let _ = Command::new("fusermount3").arg("-u").arg(&m.fuse_dir).status();
    let _ = m.nbdfuse.wait();
}

#[test]
fn ext4_on_nbdfuse_loop_survives_cluster_restart() {
    let _g = serial();
    for tool in ["nbdfuse", "losetup", "mkfs.ext4", "fusermount3"] {
        require_tool(tool);
    }
    let mut c = LocalCluster::start("parallel", "256M");
    let work = tempfile::tempdir().unwrap();
    let m = mount(&c.uri(), work.path(), true);
    // Files of several sizes with their checksums.
    sh(&format!(
        "cd {mnt} && for i in 1 2 3 4 5; do head -c $((i * 700000)) /dev/urandom > f$i; done && \
         mkdir -p d && seq 1 20000 > d/seq && sha256sum f1 f2 f3 f4 f5 d/seq > ../sums && sync",
        mnt = m.mnt.display()
    ));
    unmount(m);
    c.restart_all();
    let m = mount(&c.uri(), work.path(), false);
    sh(&format!("cd {} && sha256sum -c ../sums", m.mnt.display()));
    unmount(m);
}

/// Also without polling (`--poll-us 0`): the other real-process tests run with the default.
#[test]
fn classic_raft_mode_serves_the_same_clients() {
    let _g = serial();
    require_tool("fio");
    let c = LocalCluster::start_with("raft", "128M", 3, &["--poll-us", "0"]);
    let info = run_ok(Command::new("nbdinfo").arg(c.uri()));
    assert!(info.contains("Raft mode"), "{info}");
    let out = run_ok(&mut fio_verify(&c.uri(), 16, 2, 8, 64));
    let job = fio_job(&out);
    assert_eq!(job["error"], 0, "{out}");
    assert_eq!(job["read"]["io_bytes"].as_u64(), Some(2 * (8 << 20)));
}
