#!/bin/sh
# TLS for a Dask cluster: a throwaway CA, one certificate for its members (scheduler, workers and clients such as
# `swirl generate`), and the Dask config that makes them speak TLS only and refuse anyone without a certificate.
#
#   sh docker/dask-tls.sh OUT_DIR [DIR_AS_READ]
#
# OUT_DIR gets ca.pem, cert.pem, key.pem and dask.yaml; DIR_AS_READ is the folder's path where the processes
# read it (default: OUT_DIR; /etc/swirl/dask-tls inside docker/compose.yaml). Copy the folder to every machine
# of the cluster and export DASK_CONFIG=<that folder>. Whoever holds key.pem can run code on the workers: keep
# it readable by the cluster's user only. The CA key is deleted once the certificate is signed; to rotate, run
# this again and restart the cluster.
set -eu
[ $# -ge 1 ] || { echo "usage: sh docker/dask-tls.sh OUT_DIR [DIR_AS_READ]" >&2; exit 64; }
mkdir -p "$1"
cd "$1"
dir=${2:-$(pwd)}
umask 077
ec="-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
openssl req -x509 $ec -days 365 -subj "/CN=swirl-dask-ca" -keyout ca.key -out ca.pem \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
openssl req $ec -subj "/CN=swirl-dask" -keyout key.pem -out cert.csr 2>/dev/null
printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
  "extendedKeyUsage=serverAuth,clientAuth" "subjectAltName=DNS:swirl-dask" > cert.ext
openssl x509 -req -in cert.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 365 -extfile cert.ext -out cert.pem 2>/dev/null
rm -f ca.key ca.srl cert.csr cert.ext
cat > dask.yaml <<YAML
# Written by docker/dask-tls.sh: TLS only between the members of this Dask cluster.
distributed:
  comm:
    require-encryption: true
    tls:
      ca-file: $dir/ca.pem
      scheduler: {cert: $dir/cert.pem, key: $dir/key.pem}
      worker: {cert: $dir/cert.pem, key: $dir/key.pem}
      client: {cert: $dir/cert.pem, key: $dir/key.pem}
YAML
echo "wrote $(pwd)/{ca.pem,cert.pem,key.pem,dask.yaml}: export DASK_CONFIG=$dir"
