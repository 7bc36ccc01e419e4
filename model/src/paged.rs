//! The server's device cache: every sequence's cached rows in the pages of one store, per layer one
//! buffer of KV rows in the sparse MLA kernel's layout and one of indexer keys, row = page · page_size +
//! slot. A sequence is a page table and a length; sequences sharing a cached prefix read the same pages
//! (nothing is copied), and attention reads the store's buffer directly through each sequence's rows.
//! The pages are the scheduler's; the buffers grow (doubling) to the highest page written.
//!
//! KV rows are f32, bf16 (`--kv-cache-dtype bf16`: nsa's `cast_rows` on the way in, half the memory) or
//! DeepSeek's 656-byte FP8 layout (`--kv-cache-dtype fp8_e4m3`: nsa's `fp8_kv_quantize` on the way in).
//! Attention widens only the rows the indexer chose (`widen_rows`, `fp8_kv_dequantize`) — a gather per
//! query and chosen row, fine for small models; at DeepSeek's sizes the decode kernel should read the
//! pages itself, as `sparse_mla_decode` does. Indexer keys stay f32.
use crate::device::DeviceModel;
use crate::device_decode::{CacheRows, stack_padded};
use burn::tensor::kind::Basic;
use burn::tensor::{DType, IndexingUpdateOp, Int, Tensor, TensorData};

pub type PageId = u32;

/// Values of a cached token's KV row per layer (the sparse MLA kernel's layout, padded to 576).
pub const KV_ROW: usize = nsa_kernels::sparse_mla::D_QK;

/// How a store keeps KV rows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvFormat {
    /// The device model's own dtype.
    #[default]
    F32,
    /// 576 bf16 values a token (rounded to nearest even).
    Bf16,
    /// 656 bytes a token: 512 e4m3 latent values with 4 group scales, 64 bf16 rope values.
    Fp8,
}

impl KvFormat {
    /// How messages name it.
    pub fn name(self) -> &'static str {
        match self {
            KvFormat::F32 => "f32",
            KvFormat::Bf16 => "bf16",
            KvFormat::Fp8 => "FP8",
        }
    }

    /// Bytes of one token's KV row.
    pub fn row_bytes(self) -> usize {
        match self {
            KvFormat::F32 => 4 * KV_ROW,
            KvFormat::Bf16 => 2 * KV_ROW,
            KvFormat::Fp8 => crate::ops::FP8_TOKEN_BYTES,
        }
    }
}

/// One layer's KV rows: f32 [capacity, 576], or the narrow formats' i32 words (bf16 [capacity, 288],
/// FP8 [capacity, 164]).
enum KvRows {
    F32(Tensor<2>),
    Words(Tensor<2, Int>),
}

/// The rows of every layer, by page.
pub struct PagedStore {
    page_size: usize,
    format: KvFormat,
    /// For the bf16 / FP8 conversions.
    kernels: nsa_backends::Device,
    /// Per layer: KV rows and indexer keys [capacity, index_head_dim]; `None` until written.
    layers: Vec<Option<(KvRows, Tensor<2>)>>,
}

/// A sequence in a [`PagedStore`]: its pages in order (page i holds positions i·page_size..) and how many
/// positions are cached.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PageTable {
    pub pages: Vec<PageId>,
    pub len: usize,
}

impl PagedStore {
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    pub fn format(&self) -> KvFormat {
        self.format
    }

    /// Rows each layer's buffers hold now.
    pub fn capacity(&self) -> usize {
        (self.layers.iter().flatten())
            .map(|(_, index_k)| index_k.dims()[0])
            .max()
            .unwrap_or(0)
    }

    /// The store row of `position` of `table`.
    fn row(&self, table: &PageTable, position: usize) -> usize {
        let page = table.pages.get(position / self.page_size).unwrap_or_else(|| {
            panic!(
                "position {position} has no page ({} pages of {})",
                table.pages.len(),
                self.page_size
            )
        });
        *page as usize * self.page_size + position % self.page_size
    }

    /// Writes `kv` (f32 [n, 576]) / `index_k` rows to store rows `at` (one each, any order, all below
    /// `end`) of `layer`, growing its buffers to hold them: one conversion and one scatter per buffer.
    fn write(&mut self, layer: usize, at: &Tensor<1, Int>, end: usize, kv: Tensor<2>, index_k: Tensor<2>) {
        let (highest, needed) = (end, end.next_multiple_of(self.page_size));
        let (kv_rows, index_rows) = self.layers[layer].take().unzip();
        let device = kv.device();
        let device = &device;
        let assign = |buffer: Tensor<2>, values: Tensor<2>| {
            buffer.select_assign(0, at.clone(), values, IndexingUpdateOp::Assign)
        };
        let floats = |width: usize| move |rows: usize| Tensor::<2>::zeros([rows, width], device);
        let index_rows = assign(grown(index_rows, highest, needed, floats(index_k.dims()[1])), index_k);
        let kv_rows = match (self.format, kv_rows) {
            (KvFormat::F32, rows) => {
                let rows = rows.map(|r| match r {
                    KvRows::F32(t) => t,
                    KvRows::Words(_) => unreachable!("one format per store"),
                });
                KvRows::F32(assign(grown(rows, highest, needed, floats(kv.dims()[1])), kv))
            }
            (narrow, rows) => {
                let words = match narrow {
                    KvFormat::Bf16 => crate::ops::bf16_rows(&self.kernels, kv),
                    _ => crate::ops::fp8_kv_quantize(&self.kernels, kv),
                };
                let rows = rows.map(|r| match r {
                    KvRows::Words(t) => t,
                    KvRows::F32(_) => unreachable!("one format per store"),
                });
                let width = words.dims()[1];
                let words_zeros = |rows: usize| Tensor::<2, Int>::zeros([rows, width], device).cast(DType::I32);
                let grown = grown(rows, highest, needed, words_zeros);
                KvRows::Words(grown.select_assign(0, at.clone(), words, IndexingUpdateOp::Assign))
            }
        };
        self.layers[layer] = Some((kv_rows, index_rows));
    }
}

/// `buffer` with at least `rows` rows (`needed`, or twice its size, when it must grow; new rows from
/// `zeros(n)`, an [n, width] buffer of zeros).
fn grown<K: Basic>(
    buffer: Option<Tensor<2, K>>,
    rows: usize,
    needed: usize,
    zeros: impl Fn(usize) -> Tensor<2, K>,
) -> Tensor<2, K> {
    match buffer {
        Some(buffer) if buffer.dims()[0] >= rows => buffer,
        Some(buffer) => {
            let capacity = buffer.dims()[0];
            zeros(needed.max(2 * capacity)).slice_assign(0..capacity, buffer)
        }
        None => zeros(needed),
    }
}

/// A step's sequences in a store, with what every layer reuses on the device (uploaded once per step: the
/// pages do not change within it): the page lists end to end (sequence i's from `first_page[i]`), the
/// store rows of the step's new tokens (`new_rows`, all below `rows_end`), and the rows of the whole pages
/// holding every sequence's keys after them (`key_rows`, sequence i's position 0 at `key_starts[i]`).
struct Paged<'a, 'b> {
    store: &'a mut PagedStore,
    tables: &'a mut [&'b mut PageTable],
    pages: Tensor<1, Int>,
    first_page: Vec<usize>,
    new_rows: Tensor<1, Int>,
    rows_end: usize,
    key_rows: Tensor<1, Int>,
    key_starts: Vec<usize>,
}

impl Paged<'_, '_> {
    fn buffers(&self, layer: usize) -> &(KvRows, Tensor<2>) {
        self.store.layers[layer].as_ref().expect("rows stored in this layer")
    }

    /// The store rows of `positions` (all ≥ 0) of the sequences whose pages start at `first_pages` (one
    /// each), on the device: pages[first + p / page_size] · page_size + p % page_size.
    fn rows_of(&self, first_pages: Tensor<1, Int>, positions: Tensor<1, Int>) -> Tensor<1, Int> {
        let page_size = self.store.page_size as i64;
        let page = (self.pages.clone()).select(0, first_pages.add(positions.clone().div_scalar(page_size)));
        page.mul_scalar(page_size).add(positions.remainder_scalar(page_size))
    }
}

impl CacheRows for Paged<'_, '_> {
    fn cached(&self, seq: usize) -> usize {
        self.tables[seq].len
    }

    fn index_keys(&self, layer: usize, _: &[usize]) -> (Tensor<2>, Vec<usize>) {
        let (_, index_k) = self.buffers(layer);
        (
            index_k.clone().select(0, self.key_rows.clone()),
            self.key_starts.clone(),
        )
    }

    fn store(&mut self, layer: usize, _: &[usize], kv: Tensor<2>, index_k: Tensor<2>) {
        self.store.write(layer, &self.new_rows, self.rows_end, kv, index_k);
    }

    fn attention_rows(&self, layer: usize, chosen: Vec<Tensor<2, Int>>) -> (Tensor<2>, Tensor<2, Int>) {
        let (kv, index_k) = self.buffers(layer);
        let device = index_k.device();
        // Every query's chosen positions at once, each row knowing where its sequence's pages start.
        let first_pages: Vec<i64> = (chosen.iter().enumerate())
            .flat_map(|(seq, c)| std::iter::repeat_n(self.first_page[seq] as i64, c.dims()[0]))
            .collect();
        let positions = stack_padded(chosen);
        let [n, width] = positions.dims();
        let first_pages = Tensor::<1, Int>::from_data(TensorData::new(first_pages, [n]), &device);
        let first_pages = first_pages.reshape([n, 1]).expand([n, width]).reshape([n * width]);
        let flat = positions.reshape([n * width]);
        let rows = self.rows_of(first_pages, flat.clone().clamp_min(0));
        let rows = rows.mask_where(flat.clone().lower_elem(0), flat).reshape([n, width]);
        match kv {
            KvRows::F32(kv) => (kv.clone(), rows),
            KvRows::Words(words) => {
                // Only the chosen rows, widened: query i's row j becomes row i·width + j.
                let [n, width] = rows.dims();
                let flat = rows.reshape([n * width]);
                let gathered = words.clone().select(0, flat.clone().clamp_min(0));
                let kv = match self.store.format {
                    KvFormat::Bf16 => crate::ops::widen_bf16_rows(&self.store.kernels, gathered, index_k),
                    _ => crate::ops::fp8_kv_dequantize(&self.store.kernels, gathered, index_k),
                };
                let own = Tensor::<1, Int>::arange(0..(n * width) as i64, &device);
                let own = own.mask_where(flat.clone().lower_elem(0), flat).reshape([n, width]);
                (kv, own)
            }
        }
    }

    fn advance(&mut self, added: &[usize]) {
        for (table, &n) in self.tables.iter_mut().zip(added) {
            table.len += n;
        }
    }
}

impl DeviceModel {
    /// An empty store for this model's layers, in pages of `page_size` tokens, KV rows in `format`.
    pub fn new_store(&self, page_size: usize, format: KvFormat) -> PagedStore {
        assert!(page_size > 0, "pages hold at least one token");
        PagedStore {
            page_size,
            format,
            kernels: self.kernels.clone(),
            layers: (0..self.config.num_hidden_layers).map(|_| None).collect(),
        }
    }

    /// One pass appending `tokens[i]` (a prompt chunk or a decode token) to the sequence `tables[i]` of
    /// `store`, whose pages must cover the new positions; each sequence's last logits [vocab] on the host.
    pub fn step_paged(
        &self,
        store: &mut PagedStore,
        tables: &mut [&mut PageTable],
        tokens: &[&[u32]],
    ) -> Vec<Vec<f64>> {
        assert_eq!(tables.len(), tokens.len(), "tokens for every sequence");
        let mut first_page = Vec::with_capacity(tables.len());
        let mut pages: Vec<i64> = Vec::new();
        for table in tables.iter() {
            first_page.push(pages.len());
            pages.extend(table.pages.iter().map(|&p| p as i64));
        }
        // Store rows of the new tokens; the pages holding each sequence's keys (cached, then new).
        let page_size = store.page_size;
        let (mut new_rows, mut key_pages, mut key_starts) = (Vec::new(), Vec::new(), Vec::new());
        for (table, new) in tables.iter().zip(tokens) {
            let end = table.len + new.len();
            new_rows.extend((table.len..end).map(|p| store.row(table, p) as i64));
            key_starts.push(key_pages.len() * page_size);
            key_pages.extend(table.pages[..end.div_ceil(page_size)].iter().map(|&p| p as i64));
        }
        let rows_end = new_rows.iter().max().map_or(0, |r| *r as usize + 1);
        let int = |values: Vec<i64>| {
            let count = values.len();
            Tensor::<1, Int>::from_data(TensorData::new(values, [count]), &self.device)
        };
        let key_page_count = key_pages.len();
        let (pages, new_rows, key_pages) = (int(pages), int(new_rows), int(key_pages));
        // Every slot of those pages (written this step or before, so inside the buffers), derived on the
        // device from the page list: page · page_size + slot. Only the page lists cross to the device, not
        // a row per cached key.
        let slots = Tensor::<1, Int>::arange(0..page_size as i64, &self.device);
        let shape = [key_page_count, page_size];
        let key_rows = (key_pages
            .reshape([key_page_count, 1])
            .mul_scalar(page_size as i64)
            .expand(shape))
        .add(slots.reshape([1, page_size]).expand(shape))
        .reshape([key_page_count * page_size]);
        self.step(
            &mut Paged {
                store,
                tables,
                pages,
                first_page,
                new_rows,
                rows_end,
                key_rows,
                key_starts,
            },
            tokens,
        )
    }
}
