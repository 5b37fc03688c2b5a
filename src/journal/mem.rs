//! In-memory journal backend for unit tests. Same atomicity contract as RocksDB; nothing durable.

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::{Journal, KvOp, Result};

#[derive(Default)]
pub struct MemJournal {
    map: Mutex<BTreeMap<Vec<u8>, Vec<u8>>>,
}

impl Journal for MemJournal {
    fn write(&self, ops: Vec<KvOp>, _sync: bool) -> Result<()> {
        let mut m = self.map.lock().unwrap();
        for op in ops {
            match op {
                KvOp::Put(k, v) => {
                    m.insert(k, v);
                }
                KvOp::Delete(k) => {
                    m.remove(&k);
                }
            }
        }
        Ok(())
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.map.lock().unwrap().get(key).cloned())
    }

    fn scan_after(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        use std::ops::Bound;
        let from = match after {
            Some(a) => Bound::Excluded(a.to_vec()),
            None => Bound::Included(prefix.to_vec()),
        };
        let m = self.map.lock().unwrap();
        Ok(m.range::<Vec<u8>, _>((from, Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }
}
