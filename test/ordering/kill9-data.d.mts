/* Types of kill9-data.mjs (shared with the child process, which runs it as plain JavaScript). */
export declare function makeStream(seed: number): () => number
export declare function dataFor(seed: number, op: number, length: number): Buffer
