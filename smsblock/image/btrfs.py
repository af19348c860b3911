"""Just enough of Btrfs to read a few small files (release files, an ELF header) by path.

No maintained Btrfs reader fits here (libyal has none; dissect.btrfs is AGPL; the
``btrfs`` Python package drives the kernel's ioctls on a mounted filesystem; ``btrfs
restore`` needs the filesystem as its own file, which for a partition of a stored run
means copying it out first).  So this module walks the on-disk B-trees itself, read-only,
and only as far as a path lookup needs: superblock -> bootstrap chunks -> chunk tree ->
root tree -> the filesystem tree of the default subvolume -> directory items -> inode ->
file extents.  Single-device filesystems with SINGLE/DUP/RAID1 chunks; inline, regular
and prealloc extents; zlib and zstd compression (LZO is reported as unreadable).

Every offset and count read from disk is checked against the node it comes from; a node
must name itself (bytenr) and carry the filesystem's fsid; tree depth is bounded.
"""

from __future__ import annotations

import bisect
import io
import struct
import zlib
from dataclasses import dataclass

SUPERBLOCK_OFFSET = 0x10000
MAGIC = b"_BHRfS_M"

# item types (linux/include/uapi/linux/btrfs_tree.h)
INODE_ITEM = 1
DIR_ITEM = 84
EXTENT_DATA = 108
ROOT_ITEM = 132
CHUNK_ITEM = 228

FS_TREE_OBJECTID = 5
ROOT_TREE_DIR_OBJECTID = 6
FIRST_FREE_OBJECTID = 256

FT_DIR = 2
FT_SYMLINK = 7

# chunk profiles whose first stripe holds a full copy of the data
_RAID0, _RAID10, _RAID5, _RAID6 = 1 << 3, 1 << 6, 1 << 7, 1 << 8
MAX_LEVEL = 8
MAX_FILE = 1 << 20
MAX_CHUNKS = 1 << 17        # ~128 TiB of 1 GiB chunks
# work budget per volume: a real lookup visits a few nodes per path component, but a
# hostile tree whose internal nodes repeat one child pointer fans out exponentially
MAX_NODE_VISITS = 1 << 15
MAX_ITEMS = 1 << 19
HEADER_SIZE = 101
KEY = struct.Struct("<QBQ")


class BtrfsError(Exception):
    """The Btrfs structures are damaged or use a feature this reader does not handle."""


@dataclass(frozen=True, slots=True)
class _Chunk:
    logical: int
    length: int
    physical: int


@dataclass(frozen=True, slots=True)
class Entry:
    """A directory entry: the inode it names, its type, and the tree it lives in."""

    tree: int            # logical address of the subvolume's tree root
    inode: int
    type: int


class BtrfsVolume:
    """A read-only Btrfs filesystem on ``region`` (an object with ``pread(offset, n)``)."""

    def __init__(self, region):
        self.region = region
        sb = region.pread(SUPERBLOCK_OFFSET, 4096)
        if len(sb) < 4096 or sb[0x40:0x48] != MAGIC:
            raise BtrfsError("no Btrfs superblock at offset 0x10000")
        self.fsid = sb[0x20:0x30]
        (self.root_tree, self.chunk_root) = struct.unpack_from("<QQ", sb, 0x50)
        self.num_devices = struct.unpack_from("<Q", sb, 0x88)[0]
        self.sectorsize, self.nodesize = struct.unpack_from("<II", sb, 0x90)
        incompat = struct.unpack_from("<Q", sb, 0xBC)[0]
        self.root_level, self.chunk_level = sb[0xC6], sb[0xC7]
        if not 4096 <= self.nodesize <= 65536 or self.nodesize & (self.nodesize - 1):
            raise BtrfsError(f"node size {self.nodesize} is impossible")
        if incompat & (1 << 10):         # METADATA_UUID: nodes carry another fsid
            self.fsid = sb[0x23B:0x24B]
        self._chunks: list[_Chunk] = []        # sorted by logical address
        self._chunk_starts: list[int] = []
        self._nodes: dict[int, bytes] = {}
        self._node_visits = 0
        self._items_seen = 0
        self._levels: dict[int, int] = {}       # subvolume tree root -> its level
        self._dirs: dict[tuple[int, int], dict] = {}   # directories read so far
        self._load_sys_chunks(sb)
        self._load_chunk_tree()
        self.default_tree = self._default_subvolume_tree()

    # --- address translation ---------------------------------------------------
    def _add_chunk(self, logical: int, item: bytes) -> None:
        if len(item) < 48 + 32:
            raise BtrfsError(f"chunk item at logical {logical} is truncated")
        length, _owner, _stripe_len, ctype = struct.unpack_from("<QQQQ", item, 0)
        num_stripes = struct.unpack_from("<H", item, 44)[0]
        if num_stripes == 0 or len(item) < 48 + 32 * num_stripes:
            raise BtrfsError(f"chunk at logical {logical} has {num_stripes} stripes")
        if ctype & (_RAID0 | _RAID10 | _RAID5 | _RAID6):
            raise BtrfsError(f"chunk at logical {logical} is striped (profile 0x{ctype:x}); "
                             "only SINGLE, DUP and RAID1 are read")
        _devid, physical = struct.unpack_from("<QQ", item, 48)
        i = bisect.bisect_left(self._chunk_starts, logical)
        if i < len(self._chunks) and self._chunks[i].logical == logical:
            return                          # the chunk tree repeats a bootstrap chunk
        if len(self._chunks) >= MAX_CHUNKS:
            raise BtrfsError(f"more than {MAX_CHUNKS} chunks")
        self._chunks.insert(i, _Chunk(logical, length, physical))
        self._chunk_starts.insert(i, logical)

    def _load_sys_chunks(self, sb: bytes) -> None:
        size = struct.unpack_from("<I", sb, 0xA0)[0]
        if size > 2048:
            raise BtrfsError(f"bootstrap chunk array of {size} bytes is too large")
        arr = sb[0x32B:0x32B + size]
        pos = 0
        while pos + 17 + 48 <= len(arr):
            _objectid, ktype, logical = KEY.unpack_from(arr, pos)
            pos += 17
            if ktype != CHUNK_ITEM:
                raise BtrfsError(f"bootstrap chunk array holds item type {ktype}")
            n = struct.unpack_from("<H", arr, pos + 44)[0]
            item_len = 48 + 32 * n
            self._add_chunk(logical, arr[pos:pos + item_len])
            pos += item_len

    def _load_chunk_tree(self) -> None:
        for key, data in self._items(self.chunk_root, self.chunk_level, (0, 0, 0)):
            if key[1] == CHUNK_ITEM:
                self._add_chunk(key[2], data)

    def _chunk(self, logical: int) -> _Chunk:
        i = bisect.bisect_right(self._chunk_starts, logical) - 1
        if i >= 0 and logical < self._chunks[i].logical + self._chunks[i].length:
            return self._chunks[i]
        raise BtrfsError(f"logical address {logical} is in no chunk")

    def physical(self, logical: int) -> int:
        c = self._chunk(logical)
        return c.physical + (logical - c.logical)

    def read_logical(self, logical: int, length: int) -> bytes:
        out = bytearray()
        while length > 0:
            chunk = self._chunk(logical)
            phys = chunk.physical + (logical - chunk.logical)
            n = min(length, chunk.logical + chunk.length - logical)
            data = self.region.pread(phys, n)
            if len(data) != n:
                raise BtrfsError(f"logical {logical} maps to physical {phys}, past the device end")
            out += data
            logical += n
            length -= n
        return bytes(out)

    # --- B-trees ---------------------------------------------------------------
    def _node(self, logical: int, level: int) -> bytes:
        self._node_visits += 1
        if self._node_visits > MAX_NODE_VISITS:
            raise BtrfsError(f"more than {MAX_NODE_VISITS} tree nodes visited (a tree whose "
                             "nodes repeat their children?)")
        node = self._nodes.get(logical)
        if node is None:
            node = self.read_logical(logical, self.nodesize)
            if node[0x20:0x30] != self.fsid:
                raise BtrfsError(f"tree node at logical {logical} belongs to another filesystem")
            if struct.unpack_from("<Q", node, 0x30)[0] != logical:
                raise BtrfsError(f"tree node at logical {logical} names another address")
            if len(self._nodes) > 256:
                self._nodes.clear()
            self._nodes[logical] = node
        if node[0x64] != level:
            raise BtrfsError(f"tree node at logical {logical} has level {node[0x64]}, expected {level}")
        return node

    def _count_items(self, n: int) -> None:
        self._items_seen += n
        if self._items_seen > MAX_ITEMS:
            raise BtrfsError(f"more than {MAX_ITEMS} tree items read (a tree whose nodes "
                             "repeat their children?)")

    def _items(self, root: int, level: int, start: tuple[int, int, int]):
        """Yield (key, data) of every leaf item with key >= ``start``, in key order."""
        if level > MAX_LEVEL:
            raise BtrfsError(f"tree at logical {root} claims {level} levels")
        node = self._node(root, level)
        nritems = struct.unpack_from("<I", node, 0x60)[0]
        if level == 0:
            if HEADER_SIZE + nritems * 25 > len(node):
                raise BtrfsError(f"leaf at logical {root} claims {nritems} items")
            self._count_items(nritems)
            for i in range(nritems):
                base = HEADER_SIZE + i * 25
                key = KEY.unpack_from(node, base)
                off, size = struct.unpack_from("<II", node, base + 17)
                if HEADER_SIZE + off + size > len(node):
                    raise BtrfsError(f"item {i} of leaf at logical {root} runs past the leaf")
                if key >= start:
                    yield key, node[HEADER_SIZE + off:HEADER_SIZE + off + size]
            return
        if HEADER_SIZE + nritems * 33 > len(node):
            raise BtrfsError(f"node at logical {root} claims {nritems} children")
        self._count_items(nritems)
        ptrs = []
        for i in range(nritems):
            base = HEADER_SIZE + i * 33
            key = KEY.unpack_from(node, base)
            ptrs.append((key, struct.unpack_from("<Q", node, base + 17)[0]))
        for i, (key, child) in enumerate(ptrs):
            if i + 1 < len(ptrs) and ptrs[i + 1][0] <= start:
                continue            # every key under this child is below start
            yield from self._items(child, level - 1, start)

    def _range(self, tree: tuple[int, int], objectid: int, itype: int, offset: int = 0):
        for key, data in self._items(tree[0], tree[1], (objectid, itype, offset)):
            if key[0] != objectid or key[1] != itype:
                return
            yield key, data

    def _lookup(self, tree, objectid, itype, offset):
        for key, data in self._range(tree, objectid, itype, offset):
            return data if key[2] == offset else None
        return None

    def _root_item(self, subvol: int):
        """(logical address, level) of a subvolume's tree from its ROOT_ITEM."""
        best = None
        for key, data in self._range((self.root_tree, self.root_level), subvol, ROOT_ITEM):
            best = data          # the last one has the highest offset (newest)
        if best is None or len(best) < 239:
            raise BtrfsError(f"no root item for subvolume {subvol}")
        bytenr = struct.unpack_from("<Q", best, 176)[0]
        return bytenr, best[238]

    def _default_subvolume_tree(self):
        tree = (self.root_tree, self.root_level)
        subvol = FS_TREE_OBJECTID
        for _key, data in self._range(tree, ROOT_TREE_DIR_OBJECTID, DIR_ITEM):
            for name, loc, _ftype in _dir_entries(data):
                if name == b"default" and loc[1] == ROOT_ITEM:
                    subvol = loc[0]
        return self._root_item(subvol)

    # --- files -----------------------------------------------------------------
    def root(self) -> Entry:
        return Entry(self.default_tree[0], FIRST_FREE_OBJECTID, FT_DIR)

    def child(self, parent: Entry, name: str) -> Entry | None:
        """The entry called ``name`` in directory ``parent`` (None when absent)."""
        hit = self._directory(parent).get(name.encode("utf-8", "surrogateescape"))
        if hit is None:
            return None
        loc, ftype = hit
        if loc[1] == ROOT_ITEM:          # a subvolume: continue in its own tree
            bytenr, level = self._root_item(loc[0])
            self._levels[bytenr] = level
            return Entry(bytenr, FIRST_FREE_OBJECTID, FT_DIR)
        return Entry(parent.tree, loc[0], ftype)

    def _directory(self, parent: Entry) -> dict[bytes, tuple]:
        """name -> (location key, file type) of a directory, read once: the items are keyed
        by a crc32c name hash, so one name cannot be found without scanning or hashing,
        and a dozen lookups in a large /etc must not scan it a dozen times."""
        names = self._dirs.get((parent.tree, parent.inode))
        if names is None:
            names = {}
            for _key, data in self._range(self._tree(parent), parent.inode, DIR_ITEM):
                for ename, loc, ftype in _dir_entries(data):
                    names.setdefault(ename, (loc, ftype))
            self._dirs[(parent.tree, parent.inode)] = names
        return names

    def _tree(self, entry: Entry) -> tuple[int, int]:
        if entry.tree == self.default_tree[0]:
            return self.default_tree
        return entry.tree, self._levels[entry.tree]

    def read(self, entry: Entry, limit: int = MAX_FILE) -> bytes:
        """The first ``limit`` bytes of a regular file (or a symlink's target)."""
        tree = self._tree(entry)
        inode = self._lookup(tree, entry.inode, INODE_ITEM, 0)
        if inode is None or len(inode) < 24:
            raise BtrfsError(f"inode {entry.inode} has no inode item")
        size = min(struct.unpack_from("<Q", inode, 16)[0], limit)
        out = bytearray(size)
        for key, data in self._range(tree, entry.inode, EXTENT_DATA):
            file_off = key[2]
            if file_off >= size:
                break
            chunk = self._extent(data, entry.inode, file_off)
            n = min(len(chunk), size - file_off)
            out[file_off:file_off + n] = chunk[:n]
        return bytes(out)

    def _extent(self, data: bytes, inode: int, file_off: int) -> bytes:
        if len(data) < 21:
            raise BtrfsError(f"extent item of inode {inode} at {file_off} is truncated")
        ram_bytes = struct.unpack_from("<Q", data, 8)[0]
        compression, encryption, _other, etype = struct.unpack_from("<BBHB", data, 16)
        if encryption:
            raise BtrfsError(f"inode {inode} is encrypted")
        if etype == 0:                      # inline
            return _decompress(data[21:], compression, ram_bytes, inode)
        if len(data) < 53:
            raise BtrfsError(f"extent item of inode {inode} at {file_off} is truncated")
        disk_bytenr, disk_bytes, offset, num_bytes = struct.unpack_from("<QQQQ", data, 21)
        if etype == 2 or disk_bytenr == 0:  # preallocated or a hole
            return bytes(min(num_bytes, MAX_FILE))
        if compression:
            raw = self.read_logical(disk_bytenr, min(disk_bytes, MAX_FILE))
            plain = _decompress(raw, compression, ram_bytes, inode)
            return plain[offset:offset + num_bytes]
        return self.read_logical(disk_bytenr + offset, min(num_bytes, MAX_FILE))


def _dir_entries(data: bytes):
    """(name, location key, file type) of each entry packed in a DIR_ITEM."""
    pos = 0
    while pos + 30 <= len(data):
        loc = KEY.unpack_from(data, pos)
        data_len, name_len, ftype = struct.unpack_from("<HHB", data, pos + 25)
        end = pos + 30 + name_len + data_len
        if end > len(data):
            raise BtrfsError("directory item runs past its item")
        yield data[pos + 30:pos + 30 + name_len], loc, ftype
        pos = end


def _decompress(raw: bytes, compression: int, ram_bytes: int, inode: int) -> bytes:
    """At most ``min(ram_bytes, MAX_FILE)`` bytes of plain text, however well ``raw``
    compresses (a hostile extent must not expand without bound)."""
    limit = min(ram_bytes, MAX_FILE)
    if compression == 0:
        return raw
    if compression == 1:
        try:
            return zlib.decompressobj().decompress(raw, limit)
        except zlib.error as e:
            raise BtrfsError(f"inode {inode}: damaged zlib extent ({e})") from None
    if compression == 3:
        import zstandard
        try:
            with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw)) as reader:
                return reader.read(limit) if limit else b""
        except zstandard.ZstdError as e:
            raise BtrfsError(f"inode {inode}: damaged zstd extent ({e})") from None
    raise BtrfsError(f"inode {inode} uses compression type {compression} (LZO), not read here")
