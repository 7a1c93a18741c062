//! A Python environment's bytes: source files built from a shared vocabulary
//! (imports, classes, methods, comments, literals) and shared libraries built
//! from recurring machine-code-like blocks, string tables and symbol tables.
//! Shared words and blocks across files are what make real environments
//! compress and deduplicate the way they do; pure noise or one repeated line
//! would flatter or sink a compressor.

use super::Rng;
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::path::PathBuf;

const ROOTS: &[&str] = &[
    "get", "set", "data", "frame", "array", "index", "value", "node", "tree", "parse", "load",
    "config", "cache", "buffer", "stream", "token", "model", "layer", "weight", "shape", "dtype",
    "axis", "item", "key", "path", "file", "name", "type", "size", "count", "error", "result",
    "client", "server", "request", "response", "handler", "manager", "factory", "util", "core",
    "base", "test", "init", "update", "apply", "reduce", "map", "filter", "tensor", "grad",
    "device", "module", "param", "state", "dict", "list", "call", "hook", "spec", "schema",
    "field", "column", "series", "block", "chunk", "codec", "format", "writer", "reader",
];

/// Identifiers (snake_case) and class names (CamelCase) shared by all files.
struct Vocab {
    names: Vec<String>,
    classes: Vec<String>,
    modules: Vec<String>,
}

impl Vocab {
    fn new(rng: &mut Rng) -> Vocab {
        Vocab {
            names: (0..4000).map(|_| word(rng, false)).collect(),
            classes: (0..1500).map(|_| word(rng, true)).collect(),
            modules: (0..600).map(|_| word(rng, false)).collect(),
        }
    }

    fn sentence(&self, rng: &mut Rng) -> String {
        let n = 4 + rng.below(10);
        (0..n)
            .map(|_| rng.pick(&self.names).replace('_', " "))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// One to three roots joined in snake_case or CamelCase, sometimes numbered.
fn word(rng: &mut Rng, camel: bool) -> String {
    let mut s = String::new();
    for i in 0..1 + rng.below(3) {
        let root = *rng.pick(ROOTS);
        if camel {
            s.push_str(&root[..1].to_uppercase());
            s.push_str(&root[1..]);
        } else {
            if i > 0 {
                s.push('_');
            }
            s.push_str(root);
        }
    }
    if rng.chance(15) {
        s.push_str(&rng.below(100).to_string());
    }
    s
}

/// Machine-code-like bytes: "instructions" drawn from a fixed set of byte
/// patterns (a few far more common than the rest), some followed by a random
/// 32-bit operand, grouped in basic blocks that recur across libraries.
struct Code {
    patterns: Vec<Vec<u8>>,
    blocks: Vec<Vec<u8>>,
}

impl Code {
    fn new(rng: &mut Rng) -> Code {
        let patterns = (0..400)
            .map(|_| {
                (0..2 + rng.below(6))
                    .map(|_| rng.next_u64() as u8)
                    .collect()
            })
            .collect();
        let mut code = Code {
            patterns,
            blocks: Vec::new(),
        };
        code.blocks = (0..3000).map(|_| code.block(rng)).collect();
        code
    }

    fn block(&self, rng: &mut Rng) -> Vec<u8> {
        let mut b = Vec::new();
        for _ in 0..4 + rng.below(12) {
            let skewed = rng.below(self.patterns.len()) + 1;
            b.extend_from_slice(&self.patterns[rng.below(skewed)]);
            if rng.chance(30) {
                b.extend_from_slice(&(rng.next_u64() as u32).to_le_bytes());
            }
        }
        b
    }
}

/// Writes Python source files and shared libraries from one seed.
pub struct Python {
    rng: Rng,
    vocab: Vocab,
    code: Code,
}

impl Python {
    pub fn new(seed: u64) -> Python {
        let mut rng = Rng::new(seed);
        let vocab = Vocab::new(&mut rng);
        let code = Code::new(&mut rng);
        Python { rng, vocab, code }
    }

    /// The generator's random numbers, for choices about layout.
    pub fn rng(&mut self) -> &mut Rng {
        &mut self.rng
    }

    /// `len` bytes of source: a docstring, imports, then classes of methods.
    pub fn source(&mut self, len: usize) -> Vec<u8> {
        let (rng, v) = (&mut self.rng, &self.vocab);
        let mut s = String::with_capacity(len + 256);
        let _ = writeln!(
            s,
            "# {}\n\"\"\"{}.\"\"\"\n",
            v.sentence(rng),
            v.sentence(rng)
        );
        for _ in 0..1 + rng.below(6) {
            let _ = writeln!(
                s,
                "from {}.{} import {}, {}",
                rng.pick(&v.modules),
                rng.pick(&v.modules),
                rng.pick(&v.classes),
                rng.pick(&v.names)
            );
        }
        while s.len() < len {
            let (rng, v) = (&mut self.rng, &self.vocab);
            let (class, base) = (rng.pick(&v.classes), rng.pick(&v.classes));
            let _ = writeln!(
                s,
                "\nclass {class}({base}):\n    \"\"\"{}.\"\"\"\n",
                v.sentence(rng)
            );
            for _ in 0..1 + self.rng.below(8) {
                self.method(&mut s);
            }
        }
        let mut out = s.into_bytes();
        out.truncate(len);
        out
    }

    fn method(&mut self, s: &mut String) {
        let (rng, v) = (&mut self.rng, &self.vocab);
        let (a, b) = (rng.pick(&v.names), rng.pick(&v.names));
        let (name, default) = (rng.pick(&v.names), rng.below(1000));
        let _ = writeln!(s, "    def {name}(self, {a}, {b}={default}):");
        for _ in 0..1 + rng.below(8) {
            let _ = match rng.below(7) {
                0 => writeln!(s, "        # {}", v.sentence(rng)),
                1 => writeln!(
                    s,
                    "        if {a} is None:\n            raise {}Error(\"{}\")",
                    rng.pick(&v.classes),
                    v.sentence(rng)
                ),
                2 => writeln!(
                    s,
                    "        for {} in range({}):",
                    rng.pick(&v.names),
                    rng.below(4096)
                ),
                3 => writeln!(
                    s,
                    "        {} = 0x{:08x}",
                    rng.pick(&v.names),
                    rng.next_u64() as u32
                ),
                _ => writeln!(
                    s,
                    "        {} = self.{}.{}({a}, {b}, {})",
                    rng.pick(&v.names),
                    rng.pick(&v.names),
                    rng.pick(&v.names),
                    rng.below(100)
                ),
            };
        }
        let _ = writeln!(s, "        return {}\n", rng.pick(&v.names));
    }

    /// `len` bytes shaped like a shared library: an ELF header, then sections
    /// of code (recurring and fresh blocks), strings, symbols, page padding.
    pub fn shared_library(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 4096);
        out.extend_from_slice(b"\x7fELF\x02\x01\x01\0");
        out.resize(64, 0);
        while out.len() < len {
            self.text_section(&mut out);
            let rodata_end = out.len() + (8 << 10) + self.rng.below(64 << 10);
            while out.len() < rodata_end {
                out.extend_from_slice(self.vocab.sentence(&mut self.rng).as_bytes());
                out.push(0);
            }
            self.symbol_table(&mut out);
            out.resize(out.len().next_multiple_of(4096), 0);
        }
        out.truncate(len);
        out
    }

    fn text_section(&mut self, out: &mut Vec<u8>) {
        let rng = &mut self.rng;
        let end = out.len() + (64 << 10) + rng.below(512 << 10);
        while out.len() < end {
            if rng.chance(20) {
                out.extend_from_slice(&self.code.block(rng));
            } else {
                let block: &Vec<u8> = rng.pick(&self.code.blocks);
                out.extend_from_slice(block);
            }
            out.extend_from_slice(&(rng.next_u64() as u32).to_le_bytes());
        }
    }

    fn symbol_table(&mut self, out: &mut Vec<u8>) {
        let rng = &mut self.rng;
        let mut address = rng.next_u64() & 0xffff_f000;
        let mut name = 0u32;
        for _ in 0..rng.below(2000) {
            address += rng.below(4096) as u64;
            name += 4 + rng.below(40) as u32;
            out.extend_from_slice(&name.to_le_bytes());
            out.extend_from_slice(&[0x12, 0, rng.below(30) as u8, 0]);
            out.extend_from_slice(&address.to_le_bytes());
            out.extend_from_slice(&(rng.below(2048) as u64).to_le_bytes());
        }
    }
}

/// A file of a generated environment: its path under the root, its bytes.
pub struct GeneratedFile {
    pub path: PathBuf,
    pub data: Vec<u8>,
}

/// An endless `site-packages`, package by package: modules (most of them
/// small), a `RECORD`, and a shared library of 1-24 MiB whenever libraries
/// hold less than 40% of the bytes so far. Take files until you have enough.
pub struct PythonEnv {
    py: Python,
    packages: usize,
    bytes: usize,
    library_bytes: usize,
    pending: VecDeque<GeneratedFile>,
}

impl PythonEnv {
    pub fn new(seed: u64) -> PythonEnv {
        PythonEnv {
            py: Python::new(seed),
            packages: 0,
            bytes: 0,
            library_bytes: 0,
            pending: VecDeque::new(),
        }
    }

    fn next_package(&mut self) {
        let py = &mut self.py;
        let name = format!("{}{}", py.rng.pick(&py.vocab.modules), self.packages);
        let pkg = PathBuf::from("lib/python3.12/site-packages").join(name);
        self.packages += 1;
        let mut files = Vec::new();
        for m in 0..5 + py.rng.below(150) {
            let size = match py.rng.below(100) {
                0..=69 => 200 + py.rng.below(8 << 10),
                70..=94 => (8 << 10) + py.rng.below(56 << 10),
                _ => (64 << 10) + py.rng.below(448 << 10),
            };
            let sub = match py.rng.chance(40) {
                true => format!("{}/", py.rng.pick(&py.vocab.modules)),
                false => String::new(),
            };
            let file = format!("{sub}{}_{m}.py", py.rng.pick(&py.vocab.names));
            files.push((pkg.join(file), py.source(size)));
        }
        files.push((pkg.join("RECORD"), self.record()));
        let bytes: usize = files.iter().map(|f| f.1.len()).sum();
        if self.library_bytes * 10 < (self.bytes + bytes) * 4 {
            let size = (1 << 20) + self.py.rng.below(23 << 20);
            self.library_bytes += size;
            let lib = format!("_core{}.cpython-312-x86_64-linux-gnu.so", self.packages);
            files.push((pkg.join(lib), self.py.shared_library(size)));
        }
        for (path, data) in files {
            self.bytes += data.len();
            self.pending.push_back(GeneratedFile { path, data });
        }
    }

    fn record(&mut self) -> Vec<u8> {
        let rng = &mut self.py.rng;
        let mut s = String::new();
        for i in 0..20 {
            let module = rng.pick(&self.py.vocab.modules);
            let (h1, h2, size) = (rng.next_u64(), rng.next_u64(), rng.below(100_000));
            let _ = writeln!(s, "{module}/{i}.py,sha256={h1:016x}{h2:016x},{size}");
        }
        s.into_bytes()
    }
}

impl Iterator for PythonEnv {
    type Item = GeneratedFile;

    fn next(&mut self) -> Option<GeneratedFile> {
        if self.pending.is_empty() {
            self.next_package();
        }
        self.pending.pop_front()
    }
}
