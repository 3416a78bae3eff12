#!/usr/bin/env bash
# images/build.sh — build the OCI image archives the tests and the lab use, without a registry.
#
#   images/build.sh OUTDIR [busybox|nginx]...     (default: all images)
#
# Each image is made from Debian packages (fetched once with `apt-get download` into a cache,
# default build/cache/debs, override with SKIFF_DEB_CACHE) and written as OUTDIR/<name>.tar: the
# tar of an OCI image layout (oci-layout, index.json, blobs/sha256/...) whose index names the image
# with the annotation org.opencontainers.image.ref.name=<full reference>.
#
# Builds are reproducible: the same .debs and recipes give byte-identical archives (fixed mtimes
# from SOURCE_DATE_EPOCH, default 0; sorted entries; uid/gid 0; gzip -n; fixed history). An image
# whose inputs have not changed is not rebuilt. On success the script prints one line per image:
#   <reference> <manifest digest> <archive path>
# To pick up newer Debian packages, delete the cache directory.
set -euo pipefail
umask 022
export LC_ALL=C TZ=UTC

die() { echo "images/build.sh: $*" >&2; exit 1; }

[ $# -ge 1 ] || die "usage: images/build.sh OUTDIR [busybox|nginx]..."
OUTDIR=$1; shift
IMAGES=("$@")
[ ${#IMAGES[@]} -gt 0 ] || IMAGES=(busybox nginx)

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
CACHE=${SKIFF_DEB_CACHE:-$REPO/build/cache/debs}
EPOCH=${SOURCE_DATE_EPOCH:-0}
[[ $EPOCH =~ ^[0-9]+$ ]] || die "SOURCE_DATE_EPOCH must be a number of seconds, got '$EPOCH'"
CREATED=$(date -u -d "@$EPOCH" +%Y-%m-%dT%H:%M:%SZ)

for tool in apt-get dpkg dpkg-deb tar gzip sha256sum jq readelf; do
	command -v "$tool" >/dev/null || die "'$tool' not found; run 'make deps' (Debian packages: apt, dpkg, tar, gzip, coreutils, jq, binutils)"
done
tar --version 2>/dev/null | grep -q 'GNU tar' || die "GNU tar is required (for --sort=name)"

DEB_ARCH=$(dpkg --print-architecture)
case $DEB_ARCH in
	amd64) OCI_ARCH=amd64 OCI_VARIANT= ;;
	arm64) OCI_ARCH=arm64 OCI_VARIANT=v8 ;;
	armhf) OCI_ARCH=arm OCI_VARIANT=v7 ;;
	i386) OCI_ARCH=386 OCI_VARIANT= ;;
	*) OCI_ARCH=$DEB_ARCH OCI_VARIANT= ;;
esac

mkdir -p "$OUTDIR" "$CACHE" || die "cannot create $OUTDIR or $CACHE"
OUTDIR=$(cd "$OUTDIR" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/skiff-images.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# deb PKG: path of the cached .deb of PKG (downloading it once). Several cached versions: newest.
deb() {
	local pkg=$1 found
	found=$(find "$CACHE" -maxdepth 1 -name "${pkg}_*.deb" | sort -V | tail -n 1)
	if [ -z "$found" ]; then
		local dl
		dl=$(mktemp -d "$CACHE/.dl.XXXXXX")
		if ! (cd "$dl" && apt-get download -q -o APT::Sandbox::User=root "$pkg" >"$dl/log" 2>&1); then
			cat "$dl/log" >&2
			rm -rf "$dl"
			die "apt-get download $pkg failed (is the Debian mirror reachable? try 'apt-get update')"
		fi
		local f
		for f in "$dl"/*.deb; do mv -f "$f" "$CACHE/"; done
		rm -rf "$dl"
		found=$(find "$CACHE" -maxdepth 1 -name "${pkg}_*.deb" | sort -V | tail -n 1)
		[ -n "$found" ] || die "apt-get download $pkg produced no ${pkg}_*.deb in $CACHE"
	fi
	echo "$found"
}

# reproducible_tar DIR OUT: tar of DIR's contents with fixed metadata, sorted.
reproducible_tar() {
	local dir=$1 out=$2
	local entries
	mapfile -t entries < <(cd "$dir" && find . -mindepth 1 -maxdepth 1 -printf '%P\n' | sort)
	tar -C "$dir" --create --file "$out" --format=gnu --sort=name --mtime="@$EPOCH" \
		--owner=0 --group=0 --numeric-owner --no-acls --no-xattrs --no-selinux \
		-- "${entries[@]}"
}

sha() { sha256sum "$1" | cut -d' ' -f1; }
size() { stat -c %s "$1"; }

# oci_archive ROOTFS REF CONFIG_JSON OUT: write an OCI layout archive with one layer made from
# ROOTFS; CONFIG_JSON is the image config's "config" object. Prints the manifest digest.
oci_archive() {
	local rootfs=$1 ref=$2 config=$3 out=$4
	local layout=$WORK/layout blobs
	rm -rf "$layout"
	blobs=$layout/blobs/sha256
	mkdir -p "$blobs"

	reproducible_tar "$rootfs" "$WORK/layer.tar"
	local diff_id
	diff_id=$(sha "$WORK/layer.tar")
	gzip -n -9 -c "$WORK/layer.tar" >"$WORK/layer.tar.gz"
	local layer_digest layer_size
	layer_digest=$(sha "$WORK/layer.tar.gz")
	layer_size=$(size "$WORK/layer.tar.gz")
	mv "$WORK/layer.tar.gz" "$blobs/$layer_digest"
	rm -f "$WORK/layer.tar"

	jq -cn --arg created "$CREATED" --arg arch "$OCI_ARCH" --arg variant "$OCI_VARIANT" \
		--arg diff "sha256:$diff_id" --argjson config "$config" --arg by "images/build.sh ${ref}" '
		{created: $created, architecture: $arch}
		+ (if $variant == "" then {} else {variant: $variant} end)
		+ {os: "linux", config: $config,
		   rootfs: {type: "layers", diff_ids: [$diff]},
		   history: [{created: $created, created_by: $by}]}' >"$WORK/config.json"
	local config_digest config_size
	config_digest=$(sha "$WORK/config.json")
	config_size=$(size "$WORK/config.json")
	mv "$WORK/config.json" "$blobs/$config_digest"

	jq -cn --arg cd "sha256:$config_digest" --argjson cs "$config_size" \
		--arg ld "sha256:$layer_digest" --argjson ls "$layer_size" '
		{schemaVersion: 2, mediaType: "application/vnd.oci.image.manifest.v1+json",
		 config: {mediaType: "application/vnd.oci.image.config.v1+json", digest: $cd, size: $cs},
		 layers: [{mediaType: "application/vnd.oci.image.layer.v1.tar+gzip", digest: $ld, size: $ls}]}' \
		>"$WORK/manifest.json"
	local manifest_digest manifest_size
	manifest_digest=$(sha "$WORK/manifest.json")
	manifest_size=$(size "$WORK/manifest.json")
	mv "$WORK/manifest.json" "$blobs/$manifest_digest"

	jq -cn --arg md "sha256:$manifest_digest" --argjson ms "$manifest_size" --arg ref "$ref" \
		--arg arch "$OCI_ARCH" --arg variant "$OCI_VARIANT" '
		{schemaVersion: 2, mediaType: "application/vnd.oci.image.index.v1+json",
		 manifests: [{mediaType: "application/vnd.oci.image.manifest.v1+json", digest: $md, size: $ms,
		   platform: ({architecture: $arch, os: "linux"}
		     + (if $variant == "" then {} else {variant: $variant} end)),
		   annotations: {"org.opencontainers.image.ref.name": $ref,
		                  "io.containerd.image.name": $ref}}]}' >"$layout/index.json"
	printf '{"imageLayoutVersion":"1.0.0"}' >"$layout/oci-layout"

	reproducible_tar "$layout" "$out.tmp"
	mv -f "$out.tmp" "$out"
	rm -rf "$layout"
	echo "sha256:$manifest_digest"
}

# ---- recipes: each fills $WORK/rootfs and sets REF, CONFIG ----------------------------------

PATH_ENV="PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

recipe_busybox_debs() { echo busybox-static; }
recipe_busybox() {
	local root=$1 deb
	deb=$(deb busybox-static)
	dpkg-deb -x "$deb" "$WORK/x"
	mkdir -p "$root"/{bin,dev,etc,proc,root,sys,tmp,var/tmp,usr/bin,usr/sbin,sbin}
	chmod 1777 "$root/tmp" "$root/var/tmp"
	chmod 0700 "$root/root"
	install -m 0755 "$WORK/x/bin/busybox" "$root/bin/busybox"
	local applet n=0
	while read -r applet; do
		[ -n "$applet" ] && [ "$applet" != busybox ] || continue
		ln -s busybox "$root/bin/$applet"
		n=$((n + 1))
	done < <("$root/bin/busybox" --list | sort -u)
	[ "$n" -gt 100 ] || die "busybox --list printed only $n applets; is $deb a busybox-static package?"
	printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$root/etc/passwd"
	printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
	printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$root/etc/hosts"
	REF=skiff.local/busybox:stable
	CONFIG=$(jq -cn --arg path "$PATH_ENV" '{Env: [$path], Cmd: ["sh"], WorkingDir: "/"}')
}

# nginx and the runtime libraries it links (checked below with readelf), no maintainer scripts.
NGINX_DEBS=(nginx nginx-common libc6 libgcc-s1 libcrypt1 libpcre2-8-0 libssl3 zlib1g)
recipe_nginx_debs() { printf '%s\n' "${NGINX_DEBS[@]}"; }
recipe_nginx() {
	local root=$1 pkg deb
	mkdir -p "$root"
	for pkg in "${NGINX_DEBS[@]}"; do
		deb=$(deb "$pkg")
		dpkg-deb -x "$deb" "$root"
	done
	# Docs, manuals, editor and init-system files are of no use in a container, nor are glibc's
	# iconv modules (nginx does no charset conversion): 8 MB less to unpack.
	rm -rf "$root"/usr/share/{doc,man,info,lintian,bug,locale,vim,apport} \
		"$root"/etc/{init.d,logrotate.d,default,ufw} "$root"/lib/systemd "$root"/usr/lib/systemd \
		"$root"/usr/lib/*-linux-gnu*/gconv
	check_libs "$root" usr/sbin/nginx
	mkdir -p "$root"/{dev,proc,sys,tmp,run,root,var/log/nginx,var/lib/nginx,var/www/html,var/cache/nginx}
	chmod 1777 "$root/tmp"
	chmod 0700 "$root/root"
	install -m 0644 "$root/usr/share/nginx/html/index.html" "$root/var/www/html/index.html"
	install -m 0644 "$HERE/nginx/nginx.conf" "$root/etc/nginx/nginx.conf"
	printf 'root:x:0:0:root:/root:/usr/sbin/nologin\nwww-data:x:33:33:www-data:/var/www:/usr/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n' >"$root/etc/passwd"
	printf 'root:x:0:\nwww-data:x:33:\nnogroup:x:65534:\n' >"$root/etc/group"
	printf 'passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n' >"$root/etc/nsswitch.conf"
	printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$root/etc/hosts"
	REF=skiff.local/nginx:stable
	CONFIG=$(jq -cn --arg path "$PATH_ENV" '{Env: [$path], Cmd: ["nginx", "-g", "daemon off;"],
		ExposedPorts: {"80/tcp": {}}, StopSignal: "SIGQUIT", WorkingDir: "/"}')
}

# check_libs ROOT BIN: every shared library BIN needs (transitively) is in ROOT's library dirs.
check_libs() {
	local root=$1 todo=("$2") seen=" " f lib found
	while [ ${#todo[@]} -gt 0 ]; do
		f=${todo[0]}
		todo=("${todo[@]:1}")
		while read -r lib; do
			case $seen in *" $lib "*) continue ;; esac
			seen="$seen$lib "
			found=$(cd "$root" && find lib usr/lib lib64 -maxdepth 2 -name "$lib" 2>/dev/null | sort | head -n 1)
			[ -n "$found" ] || die "$f needs $lib, which no package in the nginx recipe provides; add its package to NGINX_DEBS"
			todo+=("$found")
		done < <(readelf -d "$root/$f" 2>/dev/null | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')
	done
}

# ---- main -----------------------------------------------------------------------------------

for image in "${IMAGES[@]}"; do
	case $image in
		busybox | nginx) ;;
		*) die "unknown image '$image' (known: busybox nginx)" ;;
	esac
	out=$OUTDIR/$image.tar
	stamp=$OUTDIR/.$image.stamp
	# The inputs: this script, the recipe's files, the .debs, the epoch and the architecture.
	inputs=$(
		{
			sha256sum "$HERE/build.sh"
			[ ! -d "$HERE/$image" ] || find "$HERE/$image" -type f -print0 | sort -z | xargs -0 -r sha256sum
			while read -r pkg; do sha256sum "$(deb "$pkg")" | cut -d' ' -f1; done < <("recipe_${image}_debs")
			echo "$EPOCH $DEB_ARCH"
		} | sed "s|$REPO/||" | sha256sum | cut -d' ' -f1
	)
	if [ -f "$out" ] && [ -f "$stamp" ] && [ "$(sed -n 1p "$stamp")" = "$inputs" ]; then
		echo "$(sed -n 2p "$stamp") $out"
		continue
	fi
	rm -rf "$WORK/rootfs" "$WORK/x"
	"recipe_$image" "$WORK/rootfs"
	digest=$(oci_archive "$WORK/rootfs" "$REF" "$CONFIG" "$out")
	rm -rf "$WORK/rootfs" "$WORK/x"
	printf '%s\n%s %s\n' "$inputs" "$REF" "$digest" >"$stamp"
	echo "$REF $digest $out"
done
