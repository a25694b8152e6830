#!/bin/bash
# Builds rewind's Linux guest artefacts from Debian packages only (apt-get download + dpkg-deb -x).
#
#   build.sh [microvm|stock|initramfs|rootfs|all]      (default: all)
#
# Outputs go to ${REWIND_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/rewind/images}/<key>/, where
# <key> is the first 16 hex digits of a sha256 over every input: this script, microvm.config,
# debian-versions (the pinned versions of linux-source-6.1, the cloud kernel package and
# busybox-static), init, agent, the fuzz helper's example target and patches/*.patch. stdout gets
# only that directory; progress
# (one line per step, with elapsed seconds) goes to stderr. A rerun with the same inputs only
# hashes files: it never asks apt, so an `apt-get update` does not trigger a rebuild.
#
#   microvm   -> vmlinux-microvm (ELF), config-microvm
#   stock     -> vmlinuz-stock (Debian's bzImage), vmlinux-stock (ELF taken out of it),
#                config-stock, initramfs-stock.cpio (initramfs + virtio modules)
#   initramfs -> initramfs.cpio (uncompressed newc: busybox-static, /init, the exec agent,
#                /bin/rewind-fuzz-example: guest-images/fuzz-helper's target, static)
#   rootfs    -> rootfs.ext4 (64 MiB ext4 root disk, same contents, /sbin/init is the same init;
#                boot it with `rewind run --guest linux --disk rootfs.ext4 --root`)
#
# Environment: REWIND_IMAGE_CACHE (cache root), REWIND_STOCK_KERNEL_PKG (override the
# linux-image-*-cloud-amd64-unsigned package), REWIND_JOBS (make -j, default 2).
# See README.md beside this file.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
self="$here/$(basename "${BASH_SOURCE[0]}")"
cache=${REWIND_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/rewind/images}
target=${1:-all}
jobs=${REWIND_JOBS:-2}
t_start=$EPOCHREALTIME

usage() { sed -n '2,22p' "$self" | sed 's/^# \{0,1\}//' >&2; exit "$1"; }
case $target in
microvm | stock | initramfs | rootfs | all) ;;
-h | --help) usage 0 ;;
*) echo "build.sh: unknown target '$target'" >&2; usage 2 ;;
esac

# ---------------------------------------------------------------- progress and errors
elapsed() { # seconds since start, one decimal
	local now=$EPOCHREALTIME
	local us=$((${now//[.,]/} - ${t_start//[.,]/}))
	printf '%d.%d' $((us / 1000000)) $((us % 1000000 / 100000))
}
step_name="" step_t0=""
times_file=""   # per-step durations, copied into the output directory
step() { # close the running step (record its duration), announce the next one
	local now=$EPOCHREALTIME
	if [ -n "$step_name" ] && [ -n "$times_file" ]; then
		local us=$((${now//[.,]/} - ${step_t0//[.,]/}))
		printf '%6d.%d s  %s\n' $((us / 1000000)) $((us % 1000000 / 100000)) "$step_name" >>"$times_file"
	fi
	step_name=$*
	step_t0=$now
	[ -n "$step_name" ] && printf 'rewind-image [%6ss] %s\n' "$(elapsed)" "$step_name" >&2
	return 0
}
die() { printf 'rewind-image: error: %s\n' "$*" >&2; exit 1; }
log_file=/dev/null
run() { # run a command with its output in the build log; on failure show the log's tail
	"$@" >>"$log_file" 2>&1 && return 0
	local st=$?
	printf 'rewind-image: error: `%s` failed (status %d); last lines of %s:\n' "$*" "$st" "$log_file" >&2
	tail -n 40 "$log_file" >&2 || true
	exit "$st"
}

# ---------------------------------------------------------------- inputs and the cache key
# The Debian versions are pinned in debian-versions (bumped on purpose), so an `apt-get update`
# never changes the key: a cached build is found without asking apt anything. A pin the archive
# no longer offers (Debian drops superseded kernel versions) falls back to apt's candidate, said
# loudly on stderr and recorded in the output's inputs.txt.
pins="$here/debian-versions"
pin() { # PKG -> the pinned version (or the pinned package name for the stock kernel)
	awk -v k="$1" '!/^#/ && $1 == k { print $2; exit }' "$pins"
}
candidate() { # PKG -> candidate version
	local v
	v=$(apt-cache policy "$1" 2>/dev/null | awk '/^ *Candidate:/ { print $2; exit }')
	[ -n "$v" ] && [ "$v" != "(none)" ] || return 1
	printf '%s\n' "$v"
}
offered() { # PKG VERSION: does apt offer exactly this version?
	apt-cache madison "$1" 2>/dev/null | awk -F'|' '{ gsub(/ /, "", $2); print $2 }' | grep -qxF -- "$2"
}
pinned_or_candidate() { # PKG -> the pinned version if offered, else the candidate (with a warning)
	local want v
	want=$(pin "$1")
	if [ -n "$want" ] && offered "$1" "$want"; then
		printf '%s\n' "$want"
		return 0
	fi
	v=$(candidate "$1") || return 1
	printf 'rewind-image: warning: %s %s (pinned in %s) is not offered by apt any more; building with %s (update the pin)\n' \
		"$1" "${want:-?}" "$pins" "$v" >&2
	printf '%s\n' "$v"
}
resolve_versions() { # sets SRC_VER CLOUD_PKG CLOUD_VER BB_VER (slow path only)
	step "resolve Debian package versions (pins in debian-versions)"
	if ! candidate busybox-static >/dev/null; then
		step "apt-get update (no usable package lists)"
		apt-get update -q >&2 || die "apt-get update failed"
	fi
	SRC_VER=$(pinned_or_candidate linux-source-6.1) || die "no installable linux-source-6.1 (apt-get update?)"
	BB_VER=$(pinned_or_candidate busybox-static) || die "no installable busybox-static"
	CLOUD_PKG=${REWIND_STOCK_KERNEL_PKG:-$(pin stock-kernel-package)}
	if [ -n "$CLOUD_PKG" ] && ! candidate "$CLOUD_PKG" >/dev/null; then
		echo "rewind-image: warning: $CLOUD_PKG is not offered by apt any more; using the current cloud kernel" >&2
		CLOUD_PKG=""
	fi
	if [ -z "$CLOUD_PKG" ]; then
		# The cloud kernel ABI that Debian's metapackage currently points at, e.g.
		# linux-image-6.1.0-56-cloud-amd64 -> linux-image-6.1.0-56-cloud-amd64-unsigned.
		local abi
		abi=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
			awk '$1 == "Depends:" && $2 ~ /^linux-image-6\.1\.[0-9]+-[0-9]+-cloud-amd64$/ { print $2; exit }')
		[ -n "$abi" ] && candidate "$abi-unsigned" >/dev/null && CLOUD_PKG=$abi-unsigned
	fi
	if [ -z "$CLOUD_PKG" ]; then # no usable metapackage: the newest 6.1 unsigned cloud image
		CLOUD_PKG=$(apt-cache search --names-only '^linux-image-6\.1\.[0-9]+-[0-9]+-cloud-amd64-unsigned$' |
			awk '{ print $1 }' | sort -V | tail -n1)
	fi
	[ -n "$CLOUD_PKG" ] || die "no linux-image-6.1*-cloud-amd64-unsigned package found"
	CLOUD_VER=$(pinned_or_candidate "$CLOUD_PKG") || die "no installable $CLOUD_PKG"
}

# The fuzz helper lives beside this recipe in the repository (guest-images/fuzz-helper) and inside
# it where rewind stages the recipe; the key names it the same either way.
helper=$here/fuzz-helper
[ -d "$helper" ] || helper=$here/../fuzz-helper
input_path() { # NAME from input_files: the file
	case $1 in
	fuzz-helper/*) echo "$helper/${1#fuzz-helper/}" ;;
	*) echo "$here/$1" ;;
	esac
}
input_files() { # the recipe's own files, relative to $here, in a fixed order
	local f
	for f in build.sh microvm.config debian-versions init agent \
		fuzz-helper/rewind_fuzz.h fuzz-helper/example_target.c; do printf '%s\n' "$f"; done
	if [ -d "$here/patches" ]; then
		(cd "$here" && find patches -type f -name '*.patch' | LC_ALL=C sort)
	fi
}
describe_inputs() { # everything the key covers, human-readable (also stored as inputs.txt)
	local f
	echo "rewind linux guest recipe"
	while read -r f; do
		printf 'file %s %s\n' "$f" "$(sha256sum <"$(input_path "$f")" | cut -c1-64)"
	done < <(input_files)
	printf 'stock kernel override %s\n' "${REWIND_STOCK_KERNEL_PKG:--}"
}

artefacts_for() {
	case $1 in
	microvm) echo "vmlinux-microvm config-microvm" ;;
	stock) echo "vmlinuz-stock vmlinux-stock config-stock initramfs-stock.cpio" ;;
	initramfs) echo "initramfs.cpio" ;;
	rootfs) echo "rootfs.ext4" ;;
	all) echo "vmlinux-microvm config-microvm vmlinuz-stock vmlinux-stock config-stock initramfs-stock.cpio initramfs.cpio rootfs.ext4" ;;
	esac
}
all_present() { # DIR: every artefact of $target is there
	local a
	for a in $(artefacts_for "$target"); do [ -f "$1/$a" ] || return 1; done
}

inputs=$(describe_inputs)
key=$(printf '%s\n' "$inputs" | sha256sum | cut -c1-16)
outdir="$cache/$key"

# ---------------------------------------------------------------- fast path
if all_present "$outdir"; then
	printf 'rewind-image [%6ss] cached: %s\n' "$(elapsed)" "$outdir" >&2
	printf '%s\n' "$outdir"
	exit 0
fi

# ---------------------------------------------------------------- slow path
[ "$(id -u)" = 0 ] || die "building needs root (apt-get install, mknod of /dev nodes in the initramfs)"
resolve_versions
mkdir -p "$cache"
exec 9>"$cache/.lock"
if ! flock -n 9; then
	printf 'rewind-image [%6ss] waiting for another build (lock %s)\n' "$(elapsed)" "$cache/.lock" >&2
	flock 9
fi
if all_present "$outdir"; then # built by whoever held the lock
	printf '%s\n' "$outdir"
	exit 0
fi
# We hold the lock, so any temporary directory left here is from a build that was killed.
rm -rf "$cache"/.tmp-*
work=$(mktemp -d "$cache/.tmp-$key.XXXXXX")
cleanup() {
	local st=$?
	if [ "$st" != 0 ] && [ -f "$work/build.log" ]; then
		cp -f "$work/build.log" "$cache/last-failed-build.log" 2>/dev/null &&
			echo "rewind-image: full log: $cache/last-failed-build.log" >&2
	fi
	rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
log_file="$work/build.log"
times_file="$work/times"
: >"$times_file"
stage="$work/out"
mkdir -p "$stage"
printf 'rewind-image [%6ss] building %s into %s\n' "$(elapsed)" "$target" "$outdir" >&2

need_microvm=0 need_stock=0 need_initramfs=0 need_rootfs=0
for a in $(artefacts_for "$target"); do
	[ -f "$outdir/$a" ] && continue
	case $a in
	vmlinux-microvm | config-microvm) need_microvm=1 ;;
	vmlinuz-stock | vmlinux-stock | config-stock | initramfs-stock.cpio) need_stock=1 ;;
	initramfs.cpio) need_initramfs=1 ;;
	rootfs.ext4) need_rootfs=1 ;;
	esac
done

# Host tools. busybox-static is downloaded and unpacked, never installed on the host.
deps=(cpio xz-utils)
[ $need_microvm = 1 ] && deps+=(gcc make bc bison flex libelf-dev libssl-dev binutils patch)
[ $need_stock = 1 ] && deps+=(kmod lz4 binutils zstd)
[ $need_rootfs = 1 ] && deps+=(e2fsprogs)
# The fuzz helper's example target, linked static into the initramfs tree (and so the root disk).
{ [ $need_initramfs = 1 ] || [ $need_stock = 1 ] || [ $need_rootfs = 1 ]; } && deps+=(gcc libc6-dev)
missing=()
for p in "${deps[@]}"; do
	dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	step "apt-get install ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get install -y -q --no-install-recommends "${missing[@]}" >>"$log_file" 2>&1 ||
		{ run apt-get update -q; run apt-get install -y -q --no-install-recommends "${missing[@]}"; }
fi

fetch_deb() { # PKG VERSION: sets DEB to the .deb in $cache/debs (downloaded once, then reused)
	local pkg=$1 ver=$2 deb="" dl f
	for f in "$cache/debs/${pkg}_${ver//:/%3a}_"*.deb; do [ -f "$f" ] && deb=$f; done
	if [ -z "$deb" ]; then
		step "apt-get download $pkg=$ver"
		dl=$(mktemp -d "$work/dl.XXXXXX")
		(cd "$dl" && apt-get download -q -o APT::Sandbox::User=root "$pkg=$ver") >>"$log_file" 2>&1 ||
			die "apt-get download $pkg=$ver failed (see $log_file)"
		for f in "$dl/${pkg}_${ver//:/%3a}_"*.deb; do [ -f "$f" ] && deb=$f; done
		[ -n "$deb" ] || die "apt-get download $pkg=$ver gave: $(ls "$dl")"
		mkdir -p "$cache/debs"
		# older versions of the same package are superseded: keep the cache bounded
		find "$cache/debs" -maxdepth 1 -name "${pkg}_*.deb" -delete
		mv "$deb" "$cache/debs/"
		deb="$cache/debs/$(basename "$deb")"
	fi
	if [ "$(dpkg-deb -f "$deb" Package)" != "$pkg" ] || [ "$(dpkg-deb -f "$deb" Version)" != "$ver" ]; then
		die "$deb is not $pkg $ver"
	fi
	DEB=$deb
}

# ---------------------------------------------------------------- initramfs
# Reproducible cpio: fixed order, uid/gid 0, mtime 0, no host inode numbers.
make_cpio() { # DIR OUT
	find "$1" -exec touch -h -d @0 {} +
	(cd "$1" && find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort |
		cpio -o -H newc -R 0:0 --reproducible --quiet) >"$2.tmp" || die "cpio of $1 failed"
	mv "$2.tmp" "$2"
}
initramfs_tree() { # DIR: busybox-static, /init, the agent, the /dev nodes early output needs
	local dir=$1 bb p
	bb="$work/busybox-static"
	if [ ! -d "$bb" ]; then
		fetch_deb busybox-static "$BB_VER"
		run dpkg-deb -x "$DEB" "$bb"
	fi
	mkdir -p "$dir"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,etc,root}
	chmod 1777 "$dir/tmp"
	install -m 0755 "$bb/bin/busybox" "$dir/bin/busybox"
	for p in $("$dir/bin/busybox" --list-full); do
		[ -e "$dir/$p" ] || [ -L "$dir/$p" ] || ln -s /bin/busybox "$dir/$p"
	done
	install -m 0755 "$here/init" "$dir/init"
	install -m 0755 "$here/agent" "$dir/bin/rewind-agent"
	run gcc -static -O2 -Wall -Werror -o "$dir/bin/rewind-fuzz-example" \
		"$helper/example_target.c"
	# Created in the archive itself (we are root), so /init has a console before devtmpfs.
	mknod -m 0600 "$dir/dev/console" c 5 1
	mknod -m 0666 "$dir/dev/null" c 1 3
	mknod -m 0660 "$dir/dev/ttyS0" c 4 64
	mknod -m 0660 "$dir/dev/ttyS1" c 4 65
}
if [ $need_initramfs = 1 ] || [ $need_stock = 1 ] || [ $need_rootfs = 1 ]; then
	fetch_deb busybox-static "$BB_VER"
	step "initramfs: busybox-static $BB_VER + init + agent"
	initramfs_tree "$work/initramfs"
	if [ $need_initramfs = 1 ]; then
		make_cpio "$work/initramfs" "$stage/initramfs.cpio"
	fi
fi

# ---------------------------------------------------------------- ext4 root disk
# The initramfs tree on an ext4 filesystem. The kernel runs /sbin/init from a real root, so that
# is our init (not busybox's). Fixed UUID, hash seed and times so the image is reproducible.
if [ $need_rootfs = 1 ]; then
	step "rootfs: ext4 root disk (mke2fs -d)"
	cp -a "$work/initramfs" "$work/rootfs"
	rm -f "$work/rootfs/sbin/init"
	install -m 0755 "$here/init" "$work/rootfs/sbin/init"
	find "$work/rootfs" -exec touch -h -d @0 {} +
	rm -f "$stage/rootfs.ext4.tmp"
	run env E2FSPROGS_FAKE_TIME=1 mke2fs -q -F -t ext4 -L rewind-root \
		-U 5265776e-6400-4000-8000-726f6f746673 \
		-E root_owner=0:0,hash_seed=5265776e-6400-4000-8000-686173686564 \
		-d "$work/rootfs" "$stage/rootfs.ext4.tmp" 64M
	run e2fsck -fn "$stage/rootfs.ext4.tmp"
	mv "$stage/rootfs.ext4.tmp" "$stage/rootfs.ext4"
fi

# ---------------------------------------------------------------- stock Debian cloud kernel
# An ELF vmlinux out of a bzImage: the payload is the stripped vmlinux, compressed (Debian 6.1
# uses LZ4). Like the kernel's scripts/extract-vmlinux: try each compression magic, keep the
# first result that readelf accepts. Booting the ELF skips the decompressor (slow when emulated).
extract_vmlinux() { # BZIMAGE OUT
	local img=$1 out=$2 magic tool off
	for magic in '\x02\x21\x4c\x18:lz4 -dc' '\xfd\x37\x7a\x58\x5a\x00:xz -dc' \
		'\x28\xb5\x2f\xfd:zstd -dc' '\x1f\x8b\x08:gzip -dc'; do
		tool=${magic#*:}
		command -v "${tool%% *}" >/dev/null || continue
		for off in $(LC_ALL=C grep -obaUP "${magic%%:*}" "$img" 2>/dev/null | cut -d: -f1 | head -n 8); do
			tail -c +$((off + 1)) "$img" | $tool >"$out" 2>/dev/null || true
			if readelf -h "$out" >/dev/null 2>&1; then return 0; fi
		done
	done
	rm -f "$out"
	return 1
}
if [ $need_stock = 1 ]; then
	fetch_deb "$CLOUD_PKG" "$CLOUD_VER"
	step "stock: unpack $CLOUD_PKG $CLOUD_VER"
	run dpkg-deb -x "$DEB" "$work/stock"
	kver=$(ls "$work/stock/lib/modules")
	[ -f "$work/stock/boot/vmlinuz-$kver" ] || die "$CLOUD_PKG has no /boot/vmlinuz-$kver"
	cp "$work/stock/boot/vmlinuz-$kver" "$stage/vmlinuz-stock"
	cp "$work/stock/boot/config-$kver" "$stage/config-stock"
	step "stock: extract the ELF vmlinux from vmlinuz-$kver"
	extract_vmlinux "$stage/vmlinuz-stock" "$stage/vmlinux-stock" ||
		die "could not extract an ELF vmlinux from vmlinuz-$kver"
	step "stock: modules virtio virtio_ring virtio_mmio virtio_blk (+ deps) into initramfs-stock.cpio"
	moddir="$work/stock/lib/modules/$kver"
	run depmod -b "$work/stock" "$kver" # Debian ships no modules.dep (its postinst makes it)
	declare -A dep_of=() path_of=() loaded=()
	while IFS= read -r line; do
		m=${line%%:*}
		n=$(basename "$m")
		n=${n%%.ko*}
		n=${n//-/_}
		path_of[$n]=$m
		dep_of[$n]=${line#*:}
	done <"$moddir/modules.dep"
	order=()
	add_module() { # NAME or PATH: dependencies first (depth first), each once
		local n=$1 d
		n=$(basename "$n")
		n=${n%%.ko*}
		n=${n//-/_}
		[ -n "${loaded[$n]:-}" ] && return 0
		if [ -z "${path_of[$n]:-}" ]; then
			grep -q "/$n.ko" "$moddir/modules.builtin" 2>/dev/null && { loaded[$n]=builtin; return 0; }
			die "module $n not found in $CLOUD_PKG"
		fi
		loaded[$n]=1
		for d in ${dep_of[$n]}; do add_module "$d"; done
		order+=("${path_of[$n]}")
	}
	for m in virtio virtio_ring virtio_mmio virtio_blk; do add_module "$m"; done
	cp -a "$work/initramfs" "$work/initramfs-stock"
	: >"$work/initramfs-stock/etc/rewind-modules"
	for m in "${order[@]}"; do
		dst="$work/initramfs-stock/lib/modules/$kver/${m%.ko*}.ko"
		mkdir -p "$(dirname "$dst")"
		case $m in
		*.ko) cp "$moddir/$m" "$dst" ;;
		*.ko.xz) xz -dc "$moddir/$m" >"$dst" ;;
		*.ko.zst) zstd -qdc "$moddir/$m" >"$dst" ;;
		*.ko.gz) gzip -dc "$moddir/$m" >"$dst" ;;
		*) die "unknown module format: $m" ;;
		esac
		printf '/lib/modules/%s/%s.ko\n' "$kver" "${m%.ko*}" >>"$work/initramfs-stock/etc/rewind-modules"
	done
	printf 'rewind-image           load order: %s\n' "$(tr '\n' ' ' <"$work/initramfs-stock/etc/rewind-modules")" >&2
	make_cpio "$work/initramfs-stock" "$stage/initramfs-stock.cpio"
fi

# ---------------------------------------------------------------- microvm kernel
# The kernel build is cached on its own inputs too ($cache/parts/microvm-<hash>): the fragment,
# the patches, the linux-source version and this function's own text, so that editing init, the
# agent or other parts of this script does not cost a 5-minute kernel build.
build_microvm_kernel() { # OUTDIR
	local out=$1 tree p bad=() line opt val
	fetch_deb linux-source-6.1 "$SRC_VER"
	step "microvm: unpack linux-source-6.1 $SRC_VER"
	run dpkg-deb -x "$DEB" "$work/src-deb"
	[ -f "$work/src-deb/usr/src/linux-source-6.1.tar.xz" ] || die "linux-source-6.1 has no tarball"
	step "microvm: extract linux-source-6.1.tar.xz"
	run tar -C "$work" -xf "$work/src-deb/usr/src/linux-source-6.1.tar.xz"
	rm -rf "$work/src-deb"
	tree="$work/linux-source-6.1"
	if [ -d "$here/patches" ]; then
		for p in $(cd "$here" && find patches -type f -name '*.patch' | LC_ALL=C sort); do
			step "microvm: apply $p"
			run patch -d "$tree" -p1 --batch --forward -i "$here/$p"
		done
	fi
	# Reproducible: no build user, host or date in the kernel's version string.
	export KBUILD_BUILD_USER=rewind KBUILD_BUILD_HOST=rewind KBUILD_BUILD_VERSION=1
	export KBUILD_BUILD_TIMESTAMP="Debian linux-source-6.1 $SRC_VER"
	step "microvm: make tinyconfig + merge_config.sh -m microvm.config + olddefconfig"
	run make -C "$tree" ARCH=x86_64 tinyconfig
	run env -C "$tree" scripts/kconfig/merge_config.sh -m .config "$here/microvm.config"
	run make -C "$tree" ARCH=x86_64 olddefconfig
	# Every line of the fragment must have survived olddefconfig (an unmet dependency drops
	# an option silently).
	while IFS= read -r line; do
		if [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
			grep -qxF -- "$line" "$tree/.config" ||
				bad+=("$line (got: $(grep -E "^(# )?${BASH_REMATCH[1]}[= ]" "$tree/.config" || echo absent))")
		elif [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
			opt=${BASH_REMATCH[1]}
			if val=$(grep -E "^$opt=" "$tree/.config"); then bad+=("$line (got: $val)"); fi
		fi
	done <"$here/microvm.config"
	if [ ${#bad[@]} -gt 0 ]; then
		printf 'rewind-image: error: microvm.config options that did not take effect:\n' >&2
		printf '  %s\n' "${bad[@]}" >&2
		exit 1
	fi
	step "microvm: make -j$jobs vmlinux"
	run make -C "$tree" ARCH=x86_64 -j"$jobs" vmlinux
	readelf -h "$tree/vmlinux" 2>/dev/null | grep -q 'Class: *ELF64' || die "vmlinux is not an ELF64 file"
	mkdir -p "$out"
	cp "$tree/vmlinux" "$out/vmlinux-microvm"
	cp "$tree/.config" "$out/config-microvm"
	rm -rf "$tree"
}
if [ $need_microvm = 1 ]; then
	part_key=$({
		declare -f build_microvm_kernel
		sha256sum <"$here/microvm.config"
		if [ -d "$here/patches" ]; then
			(cd "$here" && find patches -type f -name '*.patch' | LC_ALL=C sort | xargs -r sha256sum)
		fi
		echo "linux-source-6.1 $SRC_VER"
	} | sha256sum | cut -c1-16)
	part="$cache/parts/microvm-$part_key"
	if [ -f "$part/vmlinux-microvm" ] && [ -f "$part/config-microvm" ]; then
		step "microvm: kernel unchanged, reusing $part"
	else
		build_microvm_kernel "$work/part"
		mkdir -p "$cache/parts"
		rm -rf "$part"
		mv "$work/part" "$part"
	fi
	cp "$part/vmlinux-microvm" "$part/config-microvm" "$stage/"
fi

# ---------------------------------------------------------------- publish
step "publish into $outdir"
{
	printf '%s\n' "$inputs"
	printf 'built from deb linux-source-6.1 %s\n' "$SRC_VER"
	printf 'built from deb %s %s\n' "$CLOUD_PKG" "$CLOUD_VER"
	printf 'built from deb busybox-static %s\n' "$BB_VER"
} >"$stage/inputs.txt"
for f in vmlinux-microvm vmlinux-stock; do # ELF facts a VMM's loader cares about
	elf=$stage/$f
	[ -f "$elf" ] || elf=$outdir/$f
	[ -f "$elf" ] || continue
	# XEN_ELFNOTE_PHYS32_ENTRY (type 18): the 32-bit physical PVH entry, little-endian
	pvh=$(readelf -n "$elf" 2>/dev/null | awk '
		/^ *Xen / && /\(0x00000012\)/ { want = 1; next }
		want && /description data:/ { printf "0x%s%s%s%s", $6, $5, $4, $3; exit }')
	printf '%s: ELF entry %s, PVH entry (XEN_ELFNOTE_PHYS32_ENTRY) %s\n' "$f" \
		"$(readelf -h "$elf" | awk '/Entry point address/ { print $4 }')" "${pvh:-none}"
done >"$stage/elf-info.txt"
[ -s "$stage/elf-info.txt" ] || rm -f "$stage/elf-info.txt"
step ""
{
	printf 'build of "%s" on %s (%s), make -j%s\n' "$target" "$(date -u +%FT%TZ)" "$(nproc) cpus" "$jobs"
	cat "$times_file"
	printf '%6ss total\n' "$(elapsed)"
} >"$stage/build-times-$target.txt"
if [ ! -d "$outdir" ]; then
	# first build for this key: the whole directory appears at once
	mv -T "$stage" "$outdir"
else
	# some artefacts were built before: each file appears whole (rename is atomic)
	for f in "$stage"/*; do mv -f "$f" "$outdir/"; done
fi
printf 'rewind-image [%6ss] done: %s\n' "$(elapsed)" "$outdir" >&2
printf '%s\n' "$outdir"
