/* Classifies images with an exported integer model through wgqat's C API.
 *
 *   wgqat export --checkpoint runs/demo/best.safetensors --out model.int.safetensors
 *   cc examples/c/classify.c -Iinclude -Ltarget/release -lwgqat -Wl,-rpath,$PWD/target/release -o classify
 *   ./classify model.int.safetensors photo.png [more.jpg ...]
 *
 * prints the three most probable classes of each image; with --logits first, it prints each
 * image's logits instead (one line per image, exact to the bit). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "wgqat.h"

/* wgqat's message names the call, the problem and the fix. */
static int fail(void) {
    fprintf(stderr, "error: %s\n", wgqat_last_error());
    return 1;
}

int main(int argc, char **argv) {
    int logits_only = argc > 1 && strcmp(argv[1], "--logits") == 0;
    int first = logits_only ? 2 : 1;
    if (argc - first < 2) {
        fprintf(stderr, "usage: classify [--logits] MODEL IMAGE...\n");
        return 2;
    }
    /* Before any thread starts: keeps Mesa quiet on a headless machine. */
    wgqat_prepare_headless();

    const char *model_path = argv[first];
    const char *const *images = (const char *const *)&argv[first + 1];
    size_t count = (size_t)(argc - first - 1);

    WgqatModel *model = NULL;
    if (wgqat_model_open(model_path, &model) != WGQAT_STATUS_OK) return fail();
    size_t classes = wgqat_model_classes(model);

    /* The default adapter; batches of up to 64 images per GPU submit. */
    WgqatEngine *engine = NULL;
    if (wgqat_engine_create(model, NULL, 64, &engine) != WGQAT_STATUS_OK) {
        wgqat_model_free(model);
        return fail();
    }

    float *logits = malloc(count * classes * sizeof(float));
    int rc = 0;
    if (!logits) {
        fprintf(stderr, "error: out of memory\n");
        rc = 1;
    } else if (wgqat_engine_run_files(engine, images, count, logits, count * classes) !=
               WGQAT_STATUS_OK) {
        rc = fail();
    } else {
        for (size_t i = 0; i < count; i++) {
            const float *z = logits + i * classes;
            if (logits_only) {
                for (size_t c = 0; c < classes; c++) printf(c ? " %.9g" : "%.9g", z[c]);
                printf("\n");
                continue;
            }
            size_t top[3];
            float p[3];
            size_t k = classes < 3 ? classes : 3;
            if (wgqat_top_k(z, classes, k, top, p) != WGQAT_STATUS_OK) {
                rc = fail();
                break;
            }
            printf("%s:", images[i]);
            for (size_t j = 0; j < k; j++) {
                const char *name = wgqat_model_class_name(model, top[j]);
                if (name)
                    printf(" %s %.1f%%", name, 100.0f * p[j]);
                else
                    printf(" class %zu %.1f%%", top[j], 100.0f * p[j]);
            }
            printf("\n");
        }
    }
    free(logits);
    wgqat_engine_free(engine);
    wgqat_model_free(model);
    return rc;
}
