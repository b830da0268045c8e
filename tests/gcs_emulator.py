"""A local Cloud Storage emulator for the `gcs` tests: `python -m tests.gcs_emulator PORT BUCKET`.

gcp-storage-emulator, with one gap filled where it departs from the service: its downloads
carry no `x-goog-generation` header and ignore `ifGenerationNotMatch`. Cloud Storage sends the
one and honours the other (304), and TensorStore relies on both when it reads back a file it
updates conditionally (the OCDBT manifest a checkpoint commits several times); without them a
save fails now and then with "Malformed StorageGeneration". Both are added from the object's
own record.
"""
from __future__ import annotations

import sys
from http import HTTPStatus


def main(port: int, bucket: str) -> None:
    from gcp_storage_emulator import server
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    original = objects.download

    def download(request, response, storage, *args, **kwargs):
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except NotFound:
            return original(request, response, storage, *args, **kwargs)  # its 404
        if str(obj["generation"]) in request.query.get("ifGenerationNotMatch", []):
            response.status = HTTPStatus.NOT_MODIFIED
            return None
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj["metageneration"])
        return original(request, response, storage, *args, **kwargs)

    objects.download = download  # objects.get calls it for ?alt=media
    for _, handlers in server.HANDLERS:
        for method, fn in list(handlers.items()):
            if fn is original:
                handlers[method] = download
    server.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket).run()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
