//! Both production engines (and the crash simulator) pass the same conformance suite.

mod common;

use chunkserver::storage::io::{check_batch, AlignedBuf, IoOp, OpenMode};

#[test]
fn write_read_sync_round_trip_on_every_engine() {
    let dir = tempfile::tempdir().unwrap();
    for (name, mut engine) in common::engines() {
        let path = dir.path().join(format!("f-{name}"));
        let file = engine.open(&path, OpenMode { create: true, direct: true }).unwrap();
        engine.allocate(file, 1 << 20).unwrap();
        assert!(engine.len(file).unwrap() >= 1 << 20, "{name}: allocate");
        // A batch of many writes then a sync: the sync runs after every write.
        let bufs: Vec<AlignedBuf> = (0..16u8)
            .map(|i| {
                let mut b = AlignedBuf::zeroed(8192);
                b.fill(i + 1);
                b
            })
            .collect();
        let mut ops: Vec<IoOp> =
            bufs.iter().enumerate().map(|(i, b)| IoOp::Write { file, offset: i as u64 * 8192, buf: b }).collect();
        ops.push(IoOp::Sync { file });
        let mut expected = vec![8192; 16];
        expected.push(0);
        let results = engine.submit(&mut ops);
        check_batch(&results, &expected).unwrap_or_else(|e| panic!("{name}: {e}"));
        // Writing a range back is accepted whatever is dirty in it: nothing here (O_DIRECT),
        // then buffered writes of another file, which read back unchanged after it.
        let r = engine.submit(&mut [IoOp::WriteBack { file, offset: 8192, len: 1 << 19 }]);
        check_batch(&r, &[0]).unwrap_or_else(|e| panic!("{name}: write-back: {e}"));
        let cached =
            engine.open(&dir.path().join(format!("c-{name}")), OpenMode { create: true, direct: false }).unwrap();
        let r = engine.submit(&mut [
            IoOp::Write { file: cached, offset: 4096, buf: &bufs[3] },
            IoOp::Write { file: cached, offset: 1 << 16, buf: &bufs[4] },
        ]);
        check_batch(&r, &[8192, 8192]).unwrap();
        let r = engine.submit(&mut [IoOp::WriteBack { file: cached, offset: 0, len: 1 << 20 }]);
        check_batch(&r, &[0]).unwrap_or_else(|e| panic!("{name}: write-back of cached pages: {e}"));
        let mut back = AlignedBuf::zeroed(8192);
        check_batch(&engine.submit(&mut [IoOp::Read { file: cached, offset: 1 << 16, buf: &mut back }]), &[8192])
            .unwrap();
        assert!(back.iter().all(|b| *b == 5), "{name}: read back after the write-back");
        engine.close(cached);
        for i in [0usize, 7, 15] {
            let mut back = AlignedBuf::zeroed(8192);
            let r = engine.submit(&mut [IoOp::Read { file, offset: i as u64 * 8192, buf: &mut back }]);
            check_batch(&r, &[8192]).unwrap();
            assert!(back.iter().all(|b| *b == i as u8 + 1), "{name}: read back block {i}");
        }
        // Reading past the end is a short read, reported as such.
        let len = engine.len(file).unwrap();
        let mut tail = AlignedBuf::zeroed(8192);
        let r = engine.submit(&mut [IoOp::Read { file, offset: len - 4096, buf: &mut tail }]);
        assert_eq!(*r[0].as_ref().unwrap(), 4096, "{name}: short read at the end");
        assert!(check_batch(&r, &[8192]).is_err());
        // Rename is durable and visible; listing finds the file.
        let renamed = dir.path().join(format!("g-{name}"));
        engine.rename_durable(&path, &renamed).unwrap();
        assert!(engine.list_dir(dir.path()).unwrap().contains(&renamed), "{name}: list_dir");
        engine.close(file);
        engine.remove(&renamed).unwrap();
    }
}

#[test]
fn operations_on_unknown_files_fail_cleanly() {
    for (name, mut engine) in common::engines() {
        let mut buf = AlignedBuf::zeroed(4096);
        let r =
            engine.submit(&mut [IoOp::Read { file: chunkserver::storage::io::FileId(999), offset: 0, buf: &mut buf }]);
        assert!(r[0].is_err(), "{name}: read of an unknown file must fail");
        let unknown = chunkserver::storage::io::FileId(999);
        let r = engine.submit(&mut [IoOp::WriteBack { file: unknown, offset: 0, len: 4096 }]);
        assert!(r[0].is_err(), "{name}: write-back of an unknown file must fail");
    }
}
